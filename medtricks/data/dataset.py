"""Decoded-image cache and the torch Dataset of sample dicts.

Every image goes through the same path whether cached or not: decode (DICOM windowing or bit-depth scaling) ->
channels -> downsize so the short side is at most the eval resize (256 for 224; never upsampled) -> quantize to
the file's own depth (uint8 for 8-bit files, uint16 for DICOM and 16-bit PNG). The random transforms run on that
at every epoch, so caching changes speed, not numbers.

Where the decoded images live (`data.cache`):
- `memory`: a list of uint8/uint16 tensors in the main process (DataLoader workers share it by fork);
- `disk`: one `.npy` per image under the cache folder, keyed by path, size, mtime and settings, read back with
  `np.load(allow_pickle=False)`; memory stays flat however large the set;
- `none`: decode at every access;
- `auto`: memory when the estimated size fits `cache_memory_gb`, else disk.
MONAI's CacheDataset / PersistentDataset were the candidates; they cache float32 tensors (2-4x the bytes of
uint8/uint16) and PersistentDataset stores them with torch.save pickles, so a small cache of our own is used.

`prepare_images` does the first decode of every image in DataLoader workers, fills the cache, and collects every
unreadable file with its reason, so that nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from medtricks.data.images import check_pixels, read_image, to_channels
from medtricks.data.npz import NPZ_SCALES
from medtricks.errors import DataError, MedtricksError
from medtricks.files import refuse_run_files

logger = logging.getLogger(__name__)
CACHE_FORMAT = 2  # bump when the decoded representation changes, to invalidate disk caches (2: DICOM padding)


def default_workers() -> int:
    """DataLoader workers for this machine: min(4, CPUs), as decoding is the heavy part on small CPU counts."""
    return min(4, os.cpu_count() or 1)


def default_cache_dir() -> Path:
    """$MEDTRICKS_CACHE/images, else ~/.cache/medtricks/images."""
    root = os.environ.get("MEDTRICKS_CACHE") or Path.home() / ".cache" / "medtricks"
    return Path(root) / "images"


def decode(record: dict, channels: int | None, max_side: int) -> tuple[torch.Tensor, dict]:
    """Decode one record to a quantized (C, h, w) uint8/uint16 tensor whose short side is <= max_side
    (channels None keeps the file's own)."""
    image = record["image"]
    if isinstance(image, np.ndarray):  # array sources (MedMNIST): (H, W) or (H, W, 3), dtypes per NPZ_SCALES
        scale = NPZ_SCALES.get(image.dtype, 1.0)  # floats were checked to lie in [0, 1]
        pixels = image.astype(np.float32) / scale
        pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
        check_pixels(pixels, record["key"])
        meta = {"format": "npz", "bit_depth": 8 if scale == 255.0 else 16, "size": list(image.shape[:2]),
                "photometric": "RGB" if pixels.shape[0] == 3 else "MONOCHROME2"}
        pixels = to_channels(pixels, channels) if channels else pixels
    else:
        pixels, meta = read_image(image, channels)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))
    h, w = tensor.shape[-2:]
    if min(h, w) > max_side:
        scale = max_side / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        tensor = F.interpolate(tensor[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    if meta["bit_depth"] == 16:
        quantized = (tensor.clamp(0, 1) * 65535.0).round().to(torch.int32).to(torch.uint16)
    else:
        quantized = (tensor.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return quantized.contiguous(), meta


def dequantize(image: torch.Tensor) -> torch.Tensor:
    """uint8/uint16 cache tensor -> float32 in [0, 1]."""
    scale = 65535.0 if image.dtype == torch.uint16 else 255.0
    return image.to(torch.float32) / scale


def _disk_key(record: dict, channels: int, max_side: int) -> str:
    path = Path(record["image"]).resolve()
    stat = path.stat()
    ident = [str(path), stat.st_size, stat.st_mtime_ns, channels, max_side, CACHE_FORMAT]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


class ImageStore:
    """Decoded images of a list of records, kept in memory, on disk or nowhere (see the module docstring)."""

    def __init__(self, records: list[dict], channels: int | None, max_side: int, mode: str = "memory",
                 cache_dir: str | Path | None = None):
        if mode not in ("memory", "disk", "none"):
            raise ValueError(f"ImageStore mode {mode!r}: use memory, disk or none (resolve 'auto' first)")
        self.records, self.channels, self.max_side, self.mode = records, channels, max_side, mode
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.memory: list[torch.Tensor | None] = [None] * len(records)
        if mode == "disk":
            self._check_cache_dir()

    def _check_cache_dir(self) -> None:
        """The disk cache folder exists (or is made), takes a file and is no run's own folder (which only finetune
        writes); else an error before any decoding."""
        refuse_run_files(self.cache_dir, "data.cache_dir", folder=True)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.cache_dir, prefix=".medtricks-write-test-"):
                pass
        except OSError as exc:
            raise DataError(f"data.cache_dir {self.cache_dir}: the disk cache cannot be written there "
                            f"({exc.strerror or exc}). Set data.cache_dir to a writable folder, or data.cache: "
                            f"memory or none.") from exc

    def cache_file(self, index: int) -> Path | None:
        """The .npy file of a record in disk mode (None for other modes and in-memory arrays)."""
        record = self.records[index]
        if self.mode != "disk" or isinstance(record["image"], np.ndarray):
            return None
        key = _disk_key(record, self.channels, self.max_side)
        return self.cache_dir / key[:2] / f"{key}.npy"

    def load(self, index: int) -> torch.Tensor:
        """The decoded image `index`, from the cache when it is there."""
        cached = self.memory[index]
        if cached is not None:
            return cached
        file = self.cache_file(index)
        if file is not None and file.is_file():
            try:
                return torch.from_numpy(np.load(file, allow_pickle=False))
            except (OSError, ValueError, EOFError) as exc:  # a damaged cache file: decode the image again
                logger.warning("%s: damaged cache file %s (%s); decoding the image again", self.records[index]["key"],
                               file, exc)
        image, _ = decode(self.records[index], self.channels, self.max_side)
        self.put(index, image)
        return image

    def put(self, index: int, image: torch.Tensor) -> None:
        """Keep a decoded image: in memory (memory mode, and arrays in disk mode) or as an .npy file written
        atomically (temp file + rename, so a killed process never leaves a half file behind)."""
        file = self.cache_file(index)
        if file is None:
            if self.mode != "none" or isinstance(self.records[index]["image"], np.ndarray):
                self.memory[index] = image
            return
        tmp = file.with_name(f"{file.stem}.{os.getpid()}.tmp.npy")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp, image.numpy(), allow_pickle=False)
            os.replace(tmp, file)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"data.cache_dir {self.cache_dir}: writing the disk cache failed ({exc.strerror or exc}); "
                            f"free space there, set data.cache_dir to another folder, or use data.cache: memory or "
                            f"none.") from exc


class _Decode(Dataset):
    """Decodes records for `prepare_images`; a failure comes back as a reason instead of killing the worker."""

    def __init__(self, store: ImageStore, indices: list[int], want_meta: bool):
        self.store, self.indices, self.want_meta = store, indices, want_meta

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        index = self.indices[k]
        try:
            image, meta = decode(self.store.records[index], self.store.channels, self.store.max_side)
        except MedtricksError as exc:
            return index, None, None, str(exc)
        except Exception as exc:  # an unexpected decoder failure still names the file
            return index, None, None, f"{self.store.records[index]['key']}: {type(exc).__name__}: {exc}"
        shape = list(image.shape)
        if self.store.mode == "disk" and self.store.cache_file(index) is not None:
            self.store.put(index, image)  # written by the worker; only the verdict travels back
            image = None
        elif self.store.mode == "none":
            image = None
        return index, image, (dict(meta, decoded_shape=shape) if self.want_meta else None), None


def _as_is(item):
    return item


def prepare_images(store: ImageStore, indices: list[int] | None = None, workers: int | None = None,
                   progress=None, want_meta: bool = False) -> tuple[list[int], list[tuple[str, str]], dict]:
    """Decode every image once (in parallel), fill the store's cache, and collect failures.

    Args:
        store: the ImageStore to fill.
        indices: records to prepare (default: all).
        workers: DataLoader worker processes (default `default_workers()`; 0 = in this process).
        progress: optional callable `progress(n_done, n_total)` called after each image (e.g. a progress bar).
        want_meta: also return each image's safe metadata (for `data check`).

    Returns:
        `(ok, problems, metas)`: record indices that decoded, `(key, reason)` for those that did not, and
        {index: metadata} when want_meta.
    """
    indices = list(range(len(store.records))) if indices is None else list(indices)
    workers = default_workers() if workers is None else workers
    todo = [i for i in indices if store.memory[i] is None] if not want_meta else indices
    ok = set(indices) - set(todo)
    problems, metas = [], {}
    loader = DataLoader(_Decode(store, todo, want_meta), batch_size=None, shuffle=False,
                        num_workers=min(workers, len(todo)), collate_fn=_as_is)
    for done, (index, image, meta, error) in enumerate(loader, 1):
        if error is not None:
            problems.append((store.records[index]["key"], error))
        else:
            ok.add(index)
            if image is not None:
                store.put(index, image)
            if meta is not None:
                metas[index] = meta
        if progress is not None:
            progress(done, len(todo))
    return sorted(ok), problems, metas


def resolve_cache_mode(mode: str, records: list[dict], channels: int, max_side: int, memory_gb: float) -> str:
    """Turn `auto` into memory or disk from an upper estimate of the cached bytes (16-bit, 4:3 aspect)."""
    if mode != "auto":
        return mode
    if all(isinstance(r["image"], np.ndarray) for r in records):
        return "memory"
    estimate = len(records) * channels * max_side * max_side * 4 / 3 * 2
    chosen = "memory" if estimate <= memory_gb * 2**30 else "disk"
    logger.info("cache: auto -> %s (estimate %.2f GB for %d images)", chosen, estimate / 2**30, len(records))
    return chosen


def report_problems(problems: list[tuple[str, str]], on_error: str, what: str = "images") -> None:
    """Raise for unreadable images (on_error=raise), or log every one of them (on_error=skip)."""
    if not problems:
        return
    listing = "\n".join(f"  - {reason}" for _, reason in problems)
    if on_error == "skip":
        logger.warning("skipping %d unreadable %s (data.on_error: skip):\n%s", len(problems), what, listing)
        return
    raise DataError(f"{len(problems)} unreadable {what}:\n{listing}\nFix or remove them, or set data.on_error: skip "
                    f"to leave them out (they stay listed).")


class ImageDataset(Dataset):
    """Samples `{"image": float (C, H, W) in [0, 1], "label": int, "patient_id": str}` of some store records
    (multi-label records: "label" is a float (L,) multi-hot tensor, the target of BCEWithLogitsLoss)."""

    def __init__(self, store: ImageStore, indices: list[int], transform):
        self.store, self.indices, self.transform = store, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int | tuple[int, int]) -> dict:
        """Sample at position `k`, or at `(position, seed)` from SeededSampler: the random transforms then draw
        from the global torch RNG seeded with `seed`, which is restored afterwards."""
        k, sample_seed = k if isinstance(k, tuple) else (k, None)
        index = self.indices[k]
        record = self.store.records[index]
        image = dequantize(self.store.load(index))
        if sample_seed is None:
            image = self.transform(image)
        else:
            state = torch.get_rng_state()
            torch.manual_seed(sample_seed)
            try:
                image = self.transform(image)
            finally:
                torch.set_rng_state(state)
        label = record["label"]
        if isinstance(label, tuple):
            label = torch.tensor(label, dtype=torch.float32)
        return {"image": image, "label": label, "patient_id": record["patient_id"] or record["key"]}
