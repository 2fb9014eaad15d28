"""Synthetic chest-radiograph-like phantoms written as real DICOM files (`medtricks data synth`).

SYNTHETIC DATA, for the offline demo and the tests only: no clinical meaning. A phantom is a body outline, two
dark lung fields, a bright mediastinum and spine, ribs and clavicles, blurred, with quantum-like noise. Class
`opacity` adds 1-3 focal Gaussian opacities inside the lung fields; `normal` has none. Patients share their
anatomy (body, lung and heart sizes) across their 2-6 images, so a split that ignores patients leaks.

Each file draws its storage independently of its class, so the storage carries no label shortcut:
MONOCHROME1 or MONOCHROME2, 12 or 16 bits stored in 16, with or without RescaleSlope / RescaleIntercept, with
or without a VOI window. Read back through medtricks.data.dicom, every variant displays bone-bright.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from torchvision.transforms.v2.functional import gaussian_blur

from medtricks.errors import DataError
from medtricks.files import new_folder, refuse_run_files

CLASSES = ("normal", "opacity")
MAX_IMAGES = 100_000  # a synthetic set for tests and demos; bounds what a typo in --n can write


def _ellipse(y, x, cy, cx, ry, rx):
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def phantom(anatomy: dict, opacity: bool, size: int, rng: np.random.Generator) -> np.ndarray:
    """One phantom's display image, float32 (size, size) in [0, 1], bone and opacities bright.

    Args:
        anatomy: the patient's shape parameters from `patient_anatomy`.
        opacity: add 1-3 focal opacities inside the lungs.
        size: side in pixels.
        rng: the random generator (per-image position jitter, noise, opacities).
    """
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    dy, dx = rng.normal(0, 0.02, 2)  # patient positioning differs between images
    y, x = y - dy, x - dx
    a = anatomy
    img = np.full((size, size), 0.03)
    body = _ellipse(y, x, 0.05, 0.0, 0.98 * a["body"], 0.86 * a["body"])
    img[body] = 0.38
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= _ellipse(y, x, -0.08, side * 0.37 * a["body"], 0.55 * a["lung"], 0.26 * a["lung"])
    img[lungs] = 0.14
    for k in range(9):  # posterior ribs: arcs across each lung field
        arc = np.abs(y - (-0.62 + 0.14 * k + 0.35 * (np.abs(x) - 0.35) ** 2)) < 0.018 * a["body"]
        img[arc & body & (np.abs(x) > 0.08)] += 0.13
    clavicle = np.abs(y - (-0.68 + 0.25 * np.abs(x))) < 0.025
    img[clavicle & body & (np.abs(x) < 0.6)] += 0.2
    img[_ellipse(y, x, 0.28, 0.08, 0.28 * a["heart"], 0.27 * a["heart"])] = 0.5
    img[(np.abs(x) < 0.07) & body] = 0.62  # spine and mediastinum
    if opacity:
        for _ in range(rng.integers(1, 4)):
            side = rng.choice([-1, 1])
            cy, cx = -0.08 + rng.uniform(-0.3, 0.3), side * 0.37 * a["body"] + rng.uniform(-0.1, 0.1)
            sigma, amp = rng.uniform(0.05, 0.11), rng.uniform(0.16, 0.28)
            img += amp * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2)) * lungs
    blurred = gaussian_blur(torch.from_numpy(img.astype(np.float32))[None], [9, 9], [2.0, 2.0])[0].numpy()
    noisy = blurred + rng.normal(0, 0.012, blurred.shape)
    return (np.clip(noisy, 0.0, 1.0) ** a["gamma"]).astype(np.float32)


def patient_anatomy(rng: np.random.Generator) -> dict:
    """Shape parameters shared by all images of one phantom patient."""
    return {"body": rng.uniform(0.88, 1.0), "lung": rng.uniform(0.85, 1.05), "heart": rng.uniform(0.85, 1.15),
            "gamma": rng.uniform(0.9, 1.1)}


def to_dicom(display: np.ndarray, path: Path, patient_id: str, rng: np.random.Generator) -> str:
    """Write a display image as a CR DICOM with a randomly drawn storage variant; return its photometric name.

    The stored values are chosen so that medtricks' reader maps them back to (a linear function of) `display`.
    """
    bits = int(rng.choice([12, 16]))
    top = 2**bits - 1
    photometric = str(rng.choice(["MONOCHROME1", "MONOCHROME2"]))
    slope, intercept = (float(rng.choice([0.5, 2.0])), float(rng.choice([-1024.0, 0.0, 100.0]))) \
        if rng.random() < 0.5 else (1.0, 0.0)
    stored_display = 1.0 - display if photometric == "MONOCHROME1" else display
    stored = np.round(stored_display * top).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "CR", "PA", "CHEST"
    ds.PatientName, ds.PatientID = "Synthetic^Phantom", patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImageComments = "SYNTHETIC PHANTOM generated by medtricks data synth; not a patient image"
    ds.set_pixel_data(stored, photometric_interpretation=photometric, bits_stored=bits)
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    if rng.random() < 0.5:  # a VOI window a little wider than the data, in modality units
        lo, hi = intercept, top * slope + intercept
        ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.1f}", f"{1.1 * (hi - lo):.1f}"
    ds.save_as(path, enforce_file_format=True)
    return photometric


def synthesize(out_dir: str | Path, n: int = 200, seed: int = 0, size: int = 256) -> Path:
    """Write `n` phantom DICOMs in `out_dir/images/<class>/` and `out_dir/labels.csv` (path,label,patient_id,
    photometric). Refuses an existing non-empty folder, so nothing is overwritten.

    Returns:
        The path of labels.csv.
    """
    out = Path(out_dir)
    if not 4 <= n <= MAX_IMAGES:
        raise DataError(f"--n {n}: make 4 to {MAX_IMAGES} images (at least two per class).")
    if not 32 <= size <= 4096:
        raise DataError(f"--size {size}: choose a side between 32 and 4096 pixels.")
    refuse_run_files(out, "data synth", folder=True)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: a file of that name exists; give a new folder (nothing was overwritten).")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: already exists and is not empty; choose a new folder (nothing was overwritten).")
    needed = n * (size * size * 2 + 2048)  # 16-bit pixels and a DICOM header per image
    free = shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free
    if needed > free:
        raise DataError(f"{out}: {n} images of {size} px need about {needed / 1024**3:.3g} GB, but the disk has "
                        f"{free / 1024**3:.3g} GB free; make fewer or smaller images.")
    with new_folder(out) as tmp:  # a killed synth leaves no half-written set that a rerun would refuse or misread
        rows = _write_phantoms(tmp, n, seed, size)
        with open(tmp / "labels.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "label", "patient_id", "photometric"])
            writer.writeheader()
            writer.writerows(rows)
    return out / "labels.csv"


def _write_phantoms(out: Path, n: int, seed: int, size: int) -> list[dict]:
    for name in CLASSES:
        (out / "images" / name).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows, patient = [], 0
    while len(rows) < n:
        patient += 1
        pid, anatomy = f"synth-{patient:04d}", patient_anatomy(rng)
        sick = rng.random() < 0.5
        for k in range(min(int(rng.integers(2, 7)), n - len(rows))):
            opacity = bool(sick if rng.random() < 0.85 else not sick)
            label = CLASSES[int(opacity)]
            rel = Path("images") / label / f"{pid}-{k + 1:02d}.dcm"
            photometric = to_dicom(phantom(anatomy, opacity, size, rng), out / rel, pid, rng)
            rows.append({"path": rel.as_posix(), "label": label, "patient_id": pid, "photometric": photometric})
    return rows
