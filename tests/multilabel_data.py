"""Multi-label test data shared by the multi-label tests: phantoms with two planted, independent findings (a bright
square, a dark stripe), manifests of blank images, and the fast recipe overrides of a tiny multi-label run (the
session fixtures `findings` and `ml_run` in conftest.py train it once)."""

import csv

import numpy as np
from PIL import Image

FINDINGS = ["square", "stripe"]
FAST = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "data.augment=none",
        "data.task=multilabel", "data.classes=[square, stripe]", "train.epochs=4", "train.batch_size=16",
        "train.eval_batch_size=32", "train.optimizer=adamw", "train.lr=0.002", "tricks.linear_scaling=null",
        "tricks.amp=null"]


def write_manifest(folder, rows, header=("path", "label", "patient_id")):
    """Blank 8x8 PNGs with a labels.csv of `rows` (path, label, patient id)."""
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        Image.new("L", (8, 8)).save(folder / row[0])
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return folder


def write_findings_set(folder, n_patients=100, per_patient=2, seed=0, size=32):
    """Phantoms with two independent findings: `square` (a bright 10 px square) and `stripe` (a dark 4 px band),
    each on about half of the images; grey noisy background, two images per patient."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for patient in range(n_patients):
        for k in range(per_patient):
            pixels = rng.normal(0.45, 0.05, (size, size))
            square, stripe = rng.random() < 0.5, rng.random() < 0.5
            if square:
                y, x = rng.integers(0, size - 10, 2)
                pixels[y:y + 10, x:x + 10] = 1.0
            if stripe:
                y = rng.integers(0, size - 4)
                pixels[y:y + 4, :] = 0.0
            name = f"images/p{patient:03d}_{k}.png"
            Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(folder / name)
            label = "|".join(f for f, on in zip(FINDINGS, (square, stripe), strict=True) if on) or "No Finding"
            rows.append((name, label, f"pt-{patient:03d}"))
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "label", "patient_id"))
        writer.writerows(rows)
    return folder
