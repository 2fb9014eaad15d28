"""From a recipe's data section to split datasets: source -> split -> decode/cache -> transforms.

`load_data` is what finetune and evaluate call; `check_data` (medtricks.data.check) reads the same pieces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, Sampler

from medtricks import distributed
from medtricks.data.catalog import resolve_named
from medtricks.data.dataset import (
    ImageDataset,
    ImageStore,
    default_workers,
    prepare_images,
    report_problems,
    resolve_cache_mode,
)
from medtricks.data.sources import SPLITS, LabelFormat, Source, load_source
from medtricks.data.splits import changed_splits, split_digest, split_source
from medtricks.data.transforms import cache_size, create_eval_transform, create_train_transform
from medtricks.errors import DataError, short
from medtricks.recipe import DataConfig

logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """A loaded source: its split datasets and everything a run records about the data."""

    source: Source
    splits: dict[str, ImageDataset]
    split_origin: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of images left out
    split_digest: dict[str, dict] = field(default_factory=dict)  # medtricks.data.splits.split_digest

    @property
    def classes(self) -> tuple[str, ...]:
        return self.source.classes


def resolve_source(config: DataConfig, data: str | Path | None) -> Path:
    """`--data` wins over the recipe's data.source; one of them is required. A public data set name
    (`medmnist:pneumoniamnist@28`, `nih-chestxray14`) becomes its cache folder (medtricks.data.catalog)."""
    path = data if data is not None else config.source
    if path is None:
        raise DataError("no data source: pass --data DIR|FILE|NAME or set data.source in the recipe (a folder, a "
                        "file or a public data set name: `medtricks data list`).")
    named = resolve_named(path)
    return named if named is not None else Path(path)


def _decoded(config: DataConfig, source: Source, records: list[dict], workers: int | None, progress=None):
    """Decode `records` once into a store (cache per config), raising or listing unreadable files."""
    report_problems(source.missing, config.on_error, "files listed but missing")
    max_side = cache_size(config.image_size, config.crop_fraction)
    mode = resolve_cache_mode(config.cache, records, config.channels, max_side, config.cache_memory_gb)
    store = ImageStore(records, config.channels, max_side, mode, config.cache_dir)
    ok, problems, _ = prepare_images(store, workers=config.workers if workers is None else workers,
                                     progress=progress)
    report_problems(problems, config.on_error)
    return store, ok, problems


def load_data(config: DataConfig, data: str | Path | None = None, seed: int = 0, workers: int | None = None,
              progress=None) -> DataBundle:
    """Load, split and decode a data source for training and evaluation.

    Args:
        config: the recipe's data section.
        data: a source path overriding config.source.
        seed: the recipe seed (split and nothing else here).
        workers: decode processes (default config.workers, else min(4, CPUs)).
        progress: optional callable(n_done, n_total) while images are decoded.

    Raises:
        DataError: bad source, labels or splits; unreadable images when config.on_error is "raise".
    """
    source = load_source(resolve_source(config, data), config.classes, LabelFormat.of(config))
    if not source.labelled:
        raise DataError(f"{source.root}: the images have no labels. Put them in class sub-folders or list them "
                        f"in a labels.csv with path,label columns.")
    indices, origin = split_source(source, config.split, seed)
    store, ok, problems = _decoded(config, source, source.records, workers, progress)
    good = set(ok)
    eval_transform = create_eval_transform(config.image_size, config.crop_fraction)
    train_transform = create_train_transform(config.augment, config.image_size, config.channels,
                                             config.crop_fraction)
    splits = {}
    for name in SPLITS:
        kept = [i for i in indices[name] if i in good]
        if kept:
            splits[name] = ImageDataset(store, kept, train_transform if name == "train" else eval_transform)
    return DataBundle(source, splits, origin, skipped=list(source.missing) + problems,
                      split_digest=split_digest(source, indices))


def load_eval_data(config: DataConfig, data: str | Path | None, split: str, seed: int, classes: tuple[str, ...],
                   workers: int | None = None, recorded: dict | None = None,
                   own: bool = True) -> tuple[ImageDataset, str]:
    """One split of a source for evaluation (eval transform), with the model's classes.

    `split` val / test / train re-makes the run's seeded split (same source, seed and fractions give the same
    images); `all` takes every image (an external test set). `recorded`: the run's split digests (model.json's
    data.split_digest): on the run's own source (`own`) a split that no longer matches is refused; on another one
    (a copy, a moved folder, another data set) a mismatch is a warning that this is not the run's split.
    """
    if split not in (*SPLITS, "all"):
        raise DataError(f"--split {short(split)}: choose val, test, train or all.")
    source = load_source(resolve_source(config, data), classes, LabelFormat.of(config))
    if not source.labelled:
        raise DataError(f"{source.root}: the images have no labels; `medtricks predict` scores unlabelled images.")
    if split == "all":
        chosen, origin = list(range(len(source.records))), "all images"
    else:
        indices, origin = split_source(source, config.split, seed)
        chosen = indices[split]
        changed = changed_splits(recorded, split_digest(source, {split: chosen}),
                                 "when the run was trained" if own else "in the run's")
        if own and not (isinstance(recorded, dict) and split in recorded):
            logger.warning("%s: the run records no digest of its %s split (runs made before medtricks recorded one), "
                           "so the split re-made now cannot be checked against the one it was trained with; if the "
                           "source changed since, it may hold training images.", source.root, split)
        if changed and not own:
            logger.warning("%s: %s, so this is not the run's %s split: if the source is a copy of the run's "
                           "training data (moved, or grown since), it holds images the model was trained on; score an "
                           "external set of new images with --split all.", source.root, changed[0], split)
        elif changed:
            missing = (f" {len(source.missing)} listed file(s) are missing now ({short(source.missing[0][0])}"
                       f"{', ...' if len(source.missing) > 1 else ''})." if source.missing else "")
            raise DataError(f"{source.root}: {changed[0]}, so it could hold images the model was trained on or that "
                            f"chose its epoch: the source changed since (rows added, removed or relabelled, or files "
                            f"missing), or the run's recipe.yaml seed or data.split was edited.{missing} Restore them "
                            f"as they were, or score new images as an external set (a folder or CSV of them only) "
                            f"with --data DIR --split all.")
        if not chosen:
            raise DataError(f"{source.root}: the {split} split is empty ({origin}). Score an external labelled set "
                            f"with --data DIR --split all, or choose another split (val chose the epoch and threshold, "
                            f"so its metrics are optimistic).")
    store, ok, _ = _decoded(config, source, [source.records[i] for i in chosen], workers)
    return ImageDataset(store, ok, create_eval_transform(config.image_size, config.crop_fraction)), origin


def loader_workers(config: DataConfig) -> int:
    """DataLoader worker processes: data.workers, else min(4, CPUs)."""
    return default_workers() if config.workers is None else config.workers


def create_loader(dataset: ImageDataset, batch_size: int, workers: int, sampler: Sampler | list[int],
                  drop_last: bool = False) -> DataLoader:
    """A loader whose sampler decides the order (SeededSampler for training, a shard for evaluation)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      persistent_workers=workers > 0)


def eval_loader(dataset: ImageDataset, config: DataConfig, batch_size: int) -> DataLoader:
    """This rank's shard of `dataset` in dataset order (all of it in a single process), for
    medtricks.scoring.predict_loader, which gathers the shards of all ranks."""
    return create_loader(dataset, batch_size, loader_workers(config), sampler=distributed.shard(len(dataset)))
