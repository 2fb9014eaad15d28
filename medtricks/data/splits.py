"""Seeded, stratified, patient-level splits and the leakage check.

scikit-learn's group splitters give equal folds (StratifiedGroupKFold) or no stratification
(GroupShuffleSplit); recipes ask for arbitrary fractions (0.7 / 0.15 / 0.15), so the allocation is done here:
patients are grouped into strata by their most frequent label, shuffled with the recipe seed, and each stratum is
cut by the fractions with largest-remainder rounding. All images of a patient go to one split, so no patient can
be in two splits; `find_leaks` checks that for splits a source brings itself.

Multi-label records (multi-hot labels) are stratified by their rarest finding: an image's stratum is the finding it
has that is rarest in the whole set (no finding: a stratum of its own), a patient's the most frequent of its images'.
This is the first step of iterative stratification (Sechidis et al. 2011, "On the stratification of multi-label
data"), which places the rarest labels first: each split gets its share of every rare finding as far as the
patients allow, while co-occurring frequent findings are only balanced on average.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict

import numpy as np

from medtricks.data.sources import NO_PATIENT_IDS, SPLITS, Source
from medtricks.errors import DataError
from medtricks.recipe import SplitConfig

logger = logging.getLogger(__name__)

OWN_SPLITS = "the source's own splits"  # a split origin that no seed enters (unless val is carved from train)


def _groups(records: list[dict]) -> dict[str, list[int]]:
    """Record indices per patient; a record without a patient id is its own group."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        groups[rec["patient_id"] if rec["patient_id"] is not None else f"\0image-{i}"].append(i)
    return groups


def _allocate(n: int, fractions: tuple[float, ...], rng: np.random.Generator) -> list[int]:
    """Split n items into counts proportional to `fractions` (largest remainder, random tie-break)."""
    expected = np.asarray(fractions) * n
    counts = np.floor(expected).astype(int)
    remainder = expected - counts
    order = np.lexsort((rng.random(len(fractions)), -remainder))
    for j in order[: n - counts.sum()]:
        counts[j] += 1
    return counts.tolist()


def _strata_keys(records: list[dict]) -> list[int]:
    """The stratum of each record: its label, or for a multi-hot label its rarest finding (-1: none)."""
    if not records or not isinstance(records[0]["label"], tuple):
        return [rec["label"] for rec in records]
    counts = np.sum([rec["label"] for rec in records], axis=0)
    rarity = np.argsort(np.argsort(counts, kind="stable"), kind="stable")  # 0 = the rarest finding
    keys = []
    for rec in records:
        present = [j for j, v in enumerate(rec["label"]) if v]
        keys.append(int(min(present, key=lambda j: rarity[j])) if present else -1)
    return keys


def assign_splits(records: list[dict], fractions: dict[str, float], seed: int) -> list[str]:
    """A split name for every record: stratified by label, grouped by patient, reproducible for a seed.

    Args:
        records: sample records with `label` (a class index, or a multi-hot tuple: stratified by the rarest
            finding) and `patient_id` (None = the image is its own patient).
        fractions: {split name: fraction of patients}; normalized to sum to 1.
        seed: the recipe seed; the same records and seed always give the same assignment.
    """
    rng = np.random.default_rng(seed)
    groups = _groups(records)
    keys = _strata_keys(records)
    strata: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(groups):
        labels = Counter(keys[i] for i in groups[patient])
        top = max(labels.values())
        strata[min(lab for lab, c in labels.items() if c == top)].append(patient)
    names = tuple(fractions)
    total = sum(fractions.values())
    weights = tuple(fractions[name] / total for name in names)
    out = [""] * len(records)
    for label in sorted(strata):
        patients = [strata[label][k] for k in rng.permutation(len(strata[label]))]
        start = 0
        for name, count in zip(names, _allocate(len(patients), weights, rng), strict=True):
            for patient in patients[start:start + count]:
                for i in groups[patient]:
                    out[i] = name
            start += count
    return out


def find_leaks(records: list[dict], splits: list[str] | None = None) -> dict[str, list[str]]:
    """Patients whose images are in more than one split: {patient_id: sorted split names}."""
    splits = splits if splits is not None else [r["split"] for r in records]
    seen: dict[str, set[str]] = defaultdict(set)
    for rec, split in zip(records, splits, strict=True):
        if rec["patient_id"] is not None:
            seen[rec["patient_id"]].add(split)
    return {p: sorted(s, key=SPLITS.index) for p, s in sorted(seen.items()) if len(s) > 1}


def split_digest(source: Source, indices: dict[str, list[int]]) -> dict[str, dict]:
    """Per split, its size and the sha256 of its records (key, label and patient id of each, sorted). A run records
    it in model.json, so that whoever re-makes the run's split from its source (evaluate, attack, resume...) notices
    a source that changed since (rows added, removed or relabelled): the same seed would then split other images,
    and a "test" split could hold images the model was trained on."""
    digests = {}
    for name, chosen in indices.items():
        rows = sorted(f"{r['key']}\x1f{r['label']}\x1f{r['patient_id']}" for r in (source.records[i] for i in chosen))
        digests[name] = {"n": len(rows), "sha256": hashlib.sha256("\n".join(rows).encode()).hexdigest()}
    return digests


def changed_splits(recorded, now: dict[str, dict], then: str = "when the run was trained") -> list[str]:
    """A phrase for each split whose digest differs from the run's record (`recorded`, model.json's
    data.split_digest; `then` says whose record it is); [] when they agree or the run recorded none (runs of
    versions before the record)."""
    if not isinstance(recorded, dict):
        return []
    changed = []
    for name, digest in now.items():
        old = recorded.get(name)
        if isinstance(old, dict) and old.get("sha256") != digest["sha256"]:
            changed.append(f"the {name} split now holds {digest['n']} images, {old.get('n')} {then}"
                           if old.get("n") != digest["n"] else
                           f"the {name} split now holds other images than {then} (as many, {digest['n']})")
    return changed


def split_source(source: Source, fractions: SplitConfig, seed: int) -> tuple[dict[str, list[int]], str]:
    """Indices of the source's records per split, and a sentence saying where the split came from; `seed` is the
    recipe's (fractions.seed, when set, replaces it).

    A source's own splits are kept (a missing `val` is carved from `train` at the recipe's val : train ratio,
    patient-level); otherwise the records are split by `assign_splits`. With `fractions.folds`, the split is a
    cross-validation fold (cross_validation_split). Without patient ids the split is per
    image, with a warning.

    Raises:
        DataError: when a source's own splits put one patient in two splits.
    """
    records = source.records
    seed = fractions.seed_for(seed)
    if fractions.folds:
        return cross_validation_split(source, fractions, seed)
    if source.has_splits:
        splits = [r["split"] for r in records]
        origin = OWN_SPLITS
        if "val" not in splits and fractions.val > 0:
            train = [i for i, s in enumerate(splits) if s == "train"]
            carve = {"train": fractions.train, "val": fractions.val}
            sub = assign_splits([records[i] for i in train], carve, seed)
            for i, name in zip(train, sub, strict=True):
                splits[i] = name
            share = fractions.val / (fractions.train + fractions.val)
            origin += f"; val carved from train (seed {seed}, {share:.0%} of train patients)"
            if not source.has_patient_ids:
                logger.warning(NO_PATIENT_IDS.format(source=source.root))
        leaks = find_leaks(records, splits)
        if leaks:
            shown = ", ".join(f"{p} in {'+'.join(s)}" for p, s in list(leaks.items())[:5])
            raise DataError(f"{source.root}: the source's splits put {len(leaks)} patient(s) in two splits ({shown}). "
                            f"Fix the split column so each patient is in one split, or remove it to let medtricks "
                            f"split by patient.")
    else:
        splits = assign_splits(records, {"train": fractions.train, "val": fractions.val, "test": fractions.test},
                               seed)
        if not source.has_patient_ids:
            logger.warning(NO_PATIENT_IDS.format(source=source.root))
        unit = "patient-level" if source.has_patient_ids else "per-image (no patient ids)"
        origin = (f"seeded stratified {unit} split (seed {seed}, train/val/test = "
                  f"{fractions.train:g}/{fractions.val:g}/{fractions.test:g})")
    return {name: [i for i, s in enumerate(splits) if s == name] for name in SPLITS}, origin



def fold_assignment(source: Source, folds: int, seed: int) -> list[int | None]:
    """The cross-validation fold (0..folds-1) of every record, None for the source's own test split (held out of
    the cross-validation): patient-grouped and label-stratified, reproducible for a seed."""
    pool = [i for i, rec in enumerate(source.records) if not (source.has_splits and rec["split"] == "test")]
    names = assign_splits([source.records[i] for i in pool], {str(k): 1.0 for k in range(folds)}, seed)
    out: list[int | None] = [None] * len(source.records)
    for i, name in zip(pool, names, strict=True):
        out[i] = int(name)
    return out


def cross_validation_split(source: Source, fractions: SplitConfig, seed: int) -> tuple[dict[str, list[int]], str]:
    """Fold `fractions.fold` of `fractions.folds` as test; the other folds split into train / val at the recipe's
    train : val ratio (patient-level, seeded); the source's own test split is not used."""
    folds = fold_assignment(source, fractions.folds, seed)
    rest = [i for i, f in enumerate(folds) if f is not None and f != fractions.fold]
    inner = assign_splits([source.records[i] for i in rest], {"train": fractions.train, "val": fractions.val},
                          seed + 1)  # another stream than the fold assignment
    splits = {"train": [], "val": [], "test": [i for i, f in enumerate(folds) if f == fractions.fold]}
    for i, name in zip(rest, inner, strict=True):
        splits[name].append(i)
    if not source.has_patient_ids:
        logger.warning(NO_PATIENT_IDS.format(source=source.root))
    unit = "patient-level" if source.has_patient_ids else "per-image (no patient ids)"
    origin = (f"cross-validation fold {fractions.fold} of {fractions.folds} ({unit}, seed {seed}; the other folds "
              f"split train/val = {fractions.train:g}/{fractions.val:g}"
              f"{'; the source test split unused' if source.has_splits else ''})")
    return {name: sorted(splits[name]) for name in SPLITS}, origin
