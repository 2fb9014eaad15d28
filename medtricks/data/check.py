"""`medtricks data check SOURCE`: what is in a data source, and what is wrong with it.

Counts images per class and split, patients (and patients with images in several classes), size range, bit
depths and formats; decodes every image and lists each unreadable one with its reason; reports patients present
in more than one split. A source without splits is shown with the split finetune would make (seeded,
stratified, patient-level) so the leakage check covers it too. Safe metadata only: no patient identifiers
beyond the pseudonymous patient_id column.

A multi-label source (`labels` LabelFormat(multilabel=True): data.task: multilabel, or `data check --multilabel`)
adds `task`, the images with no finding (overall and per split; `per_class` counts each finding's positives), the
number of findings per image (`labels_per_image`: {"0": images, "1": ..., ...}) and the co-occurrence matrix
(`cooccurrence`: {finding: {finding: images with both}}, its diagonal each finding's positives);
`patients_in_several_classes` is null there (a patient's images may well carry different findings).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from medtricks.data.catalog import resolve_named
from medtricks.data.dataset import ImageStore, prepare_images
from medtricks.data.sources import SPLITS, LabelFormat, count_labels, load_source
from medtricks.data.splits import find_leaks, split_source
from medtricks.errors import DataError
from medtricks.recipe import SplitConfig


def multilabel_counts(records: list[dict], classes) -> dict:
    """Of multi-hot records: images with no finding, images per number of findings and the co-occurrence counts
    (images with both findings; the diagonal: each finding's positives)."""
    labels = np.array([r["label"] for r in records], dtype=np.int64).reshape(len(records), len(classes))
    both = labels.T @ labels
    per_image = Counter(labels.sum(axis=1).tolist())
    return {"no_finding": int((labels.sum(axis=1) == 0).sum()),
            "labels_per_image": {str(k): per_image.get(k, 0) for k in range(max(per_image, default=0) + 1)},
            "cooccurrence": {a: {b: int(both[i, j]) for j, b in enumerate(classes)} for i, a in enumerate(classes)}}


def check_data(path, classes=None, split: SplitConfig | None = None, seed: int = 0, workers: int | None = None,
               progress=None, labels: LabelFormat | None = None) -> dict:
    """Inspect a data source; return a JSON-ready report (see the module docstring).

    Args:
        path: folder, CSV manifest or .npz.
        classes: expected class names (a label outside them is an error); None takes them from the source.
        split: fractions for the proposed split of a source without splits (default 0.7/0.15/0.15).
        seed: seed of the proposed split.
        workers: decode processes.
        progress: optional callable(n_done, n_total) while images are decoded.
        labels: how labels are written (LabelFormat; multilabel=True for findings joined by a separator); None:
            single-label, column `label`.

    Raises:
        DataError: when the source itself cannot be read (missing, empty, malformed manifest, unknown labels).
    """
    source = load_source(resolve_named(path) or path, classes, labels)  # a public data set name: its cache folder
    records = source.records
    report: dict = {
        "source": str(path), "kind": source.kind, "n_images": len(records) + len(source.missing),
        **({"task": "multilabel"} if source.multilabel else {}),
        "classes": list(source.classes), "per_class": count_labels(records, source.classes) if source.labelled
        else {}, "warnings": [],
    }
    if source.multilabel:
        report.update(multilabel_counts(records, source.classes))
    if source.has_patient_ids:
        patients = defaultdict(set)
        for rec in records:
            patients[rec["patient_id"]].add(rec["label"])
        report["patients"] = len(patients)
        report["patients_in_several_classes"] = None if source.multilabel else \
            sum(len(found) > 1 for found in patients.values())
    else:
        report["patients"] = None
        report["warnings"].append("no patient ids: splits are per image, and patient leakage cannot be checked")

    if source.labelled:
        try:
            indices, origin = split_source(source, split or SplitConfig(), seed)
            leaks = {}
        except DataError as exc:  # the source's own splits leak: report them instead of stopping
            indices = {name: [i for i, r in enumerate(records) if r["split"] == name] for name in SPLITS}
            origin, leaks = "the source's own splits", find_leaks(records)
            report["warnings"].append(str(exc))
        report["split_origin"] = origin
        report["splits"] = {}
        for name in SPLITS:
            chosen = [records[i] for i in indices[name]]
            entry = {"n": len(chosen), "per_class": count_labels(chosen, source.classes)}
            if source.multilabel:
                entry["no_finding"] = sum(not any(r["label"]) for r in chosen)
            if source.has_patient_ids:
                entry["patients"] = len({r["patient_id"] for r in chosen})
            report["splits"][name] = entry
        if not leaks and source.has_patient_ids:
            split_of = {i: name for name in SPLITS for i in indices[name]}
            leaks = find_leaks(records, [split_of[i] for i in range(len(records))])
        report["patients_in_several_splits"] = leaks

    store = ImageStore(records, channels=None, max_side=1 << 30, mode="none")  # decode only, full size
    _, problems, metas = prepare_images(store, workers=workers, progress=progress, want_meta=True)
    report["unreadable"] = [{"file": key, "reason": reason} for key, reason in list(source.missing) + problems]
    report["not_images"] = source.not_images
    sizes = [m["size"] for m in metas.values()]
    report["size"] = {"min_height": min(s[0] for s in sizes), "max_height": max(s[0] for s in sizes),
                      "min_width": min(s[1] for s in sizes), "max_width": max(s[1] for s in sizes)} if sizes else None
    report["formats"] = dict(Counter(m["format"] for m in metas.values()))
    report["bit_depths"] = {str(k): v for k, v in Counter(m["bit_depth"] for m in metas.values()).items()}
    report["photometric"] = dict(Counter(m.get("photometric", "") for m in metas.values()))
    return report
