"""Reading MedMNIST-style .npz archives safely: their arrays, checked, without letting a file make us allocate
more than it can honestly hold.

numpy reads an array member by decompressing it in full, sized by the shape its header claims, so a small file can
claim terabytes (MemoryError) or decompress gigabytes of zeros (a zip bomb). `npz_array` reads the member's header
first (a few bytes) and refuses a claim that disagrees with the zip directory, exceeds half of this machine's memory,
or compresses better than images ever do. Never unpickled: allow_pickle=False everywhere.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from medtricks.data.archive import MAX_RATIO, RATIO_FROM_BYTES
from medtricks.errors import DataError


def memory_bytes() -> int:
    """This machine's physical memory in bytes (a generous default where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 64 * 1024**3


# what reading a damaged or unusual zip raises: RuntimeError for an encrypted member (zip -e, 7-Zip),
# NotImplementedError for a compression method Python lacks (WinZip AES)
_ARCHIVE_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError)


def open_npz(npz_path: Path) -> np.lib.npyio.NpzFile:
    """The archive, opened lazily (no array read yet); a DataError naming the file when it is not an .npz."""
    try:
        data = np.load(npz_path, allow_pickle=False)
    except _ARCHIVE_ERRORS as exc:
        raise DataError(f"{npz_path}: not a readable .npz file ({exc}).") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{npz_path}: a single array (.npy), not an .npz archive of named arrays. Save it with "
                        f"np.savez_compressed(path, train_images=..., train_labels=...) (val_, test_ optional).")
    return data


def _check_claim(data: np.lib.npyio.NpzFile, npz_path: Path, key: str) -> None:
    """Refuse, before decompressing, a member whose header claims an impossible or unaffordable array."""
    try:
        info = data.zip.getinfo(f"{key}.npy")
        with data.zip.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0), (3, 0)):
                return  # numpy's reader refuses other versions by name
            # 3.0 is 2.0 with a UTF-8 header text: read as latin-1, its shape and dtype come out the same
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)  # the header only: nothing decompressed beyond it
            header = member.tell()
    except KeyError:
        return  # numpy names the missing key itself
    except _ARCHIVE_ERRORS:
        return  # unreadable: npz_array's own read gives the reason
    if dtype.hasobject:
        return  # pickled objects: npz_array refuses them by name
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    budget = memory_bytes() // 2
    if claimed > budget:
        raise DataError(f"{npz_path}: array '{key}' claims shape {tuple(shape)} of {dtype} ({claimed / 1024**3:.3g} "
                        f"GB), more than half of this machine's memory ({budget / 1024**3:.3g} GB). Use a smaller "
                        f"resolution or fewer images per file.")
    if claimed + header != info.file_size:
        raise DataError(f"{npz_path}: array '{key}' claims {claimed} bytes but the archive holds "
                        f"{info.file_size - header}; the file is corrupt or truncated. Download or save it again.")
    if info.file_size >= RATIO_FROM_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise DataError(f"{npz_path}: array '{key}' decompresses {info.file_size / max(info.compress_size, 1):.0f}"
                        f"-fold ({info.compress_size} to {info.file_size} bytes), far more than images ever "
                        f"compress (a zip bomb?); refused. Save the real pixels again.")


MAX_LABEL = 2**31 - 1  # a class index beyond this is a corrupt label (and would not survive a cast to int64)
# what an array source's pixels may be: integer types scaled by their full range, floats already in [0, 1]
NPZ_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def npz_array(data, npz_path: Path, key: str) -> np.ndarray:
    """One array of an .npz archive; a truncated archive or an object array (which needs pickle) is a DataError."""
    _check_claim(data, npz_path, key)
    try:
        return data[key]
    except MemoryError as exc:
        raise DataError(f"{npz_path}: array '{key}' does not fit in memory; use a smaller resolution or fewer images "
                        f"per file.") from exc
    except _ARCHIVE_ERRORS as exc:
        reason = "it holds Python objects, which medtricks never unpickles" if "pickle" in str(exc) else str(exc)
        advice = "Save images as uint8, uint16 or float arrays and labels as integers." \
            if not isinstance(exc, (RuntimeError, NotImplementedError)) else \
            "Save the arrays again with np.savez_compressed (no password, the standard compression)."
        raise DataError(f"{npz_path}: array '{key}' cannot be read ({reason}). {advice}") from exc


def check_images(images: np.ndarray, npz_path: Path, key: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1|3) pixels of a known dtype (NPZ_SCALES, or float within [0, 1]); else a DataError."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise DataError(f"{npz_path}: '{key}' has shape {images.shape}; expected (N, H, W) or (N, H, W, 3).")
    if 0 in images.shape:
        raise DataError(f"{npz_path}: '{key}' has shape {images.shape}: no images, or images without pixels.")
    if images.dtype in NPZ_SCALES:
        return images
    if images.dtype.kind != "f":
        raise DataError(f"{npz_path}: '{key}' has dtype {images.dtype}; medtricks reads uint8 (0..255), uint16 "
                        f"(0..65535) or float in [0, 1]. Convert the array first.")
    finite = np.isfinite(images)
    if not finite.all():
        raise DataError(f"{npz_path}: '{key}' holds {int((~finite).sum())} NaN or infinite value(s); fix or drop "
                        f"those images.")
    if images.min() < 0 or images.max() > 1:
        raise DataError(f"{npz_path}: '{key}' is float with values in [{images.min():.4g}, {images.max():.4g}]; "
                        f"float pixels must lie in [0, 1] (or store uint8/uint16).")
    return images


def check_multi_hot(labels: np.ndarray, npz_path: Path, key: str) -> np.ndarray:
    """(N, L) labels of 0/1 (a multi-label set); else a DataError."""
    if labels.ndim != 2:
        raise DataError(f"{npz_path}: '{key}' has shape {labels.shape}; data.task: multilabel needs (N, L) labels of "
                        f"0/1, one column per finding.")
    if labels.dtype.kind not in "iufb" or not np.all(np.isin(labels, (0, 1))):
        raise DataError(f"{npz_path}: '{key}' holds values other than 0 and 1; multi-label labels are 0/1 per "
                        f"finding.")
    return labels.astype(np.int64)


def check_labels(labels: np.ndarray, npz_path: Path, key: str) -> np.ndarray:
    """One integral class index >= 0 per image; else a DataError."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{npz_path}: '{key}' has shape {labels.shape}: a multi-label set (one column per finding); "
                        f"set data.task: multilabel, or give one class index per image.")
    labels = labels.reshape(-1)
    if labels.dtype.kind not in "iuf":
        raise DataError(f"{npz_path}: '{key}' has dtype {labels.dtype}; labels must be integer class indices.")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise DataError(f"{npz_path}: '{key}' holds {int((~np.isfinite(labels)).sum())} NaN or infinite label(s); "
                        f"labels must be integer class indices.")
    if labels.size and labels.max() > MAX_LABEL:  # before any cast: 1e20 or 2**64 - 1 would wrap around
        raise DataError(f"{npz_path}: '{key}' holds the label {labels.max().item()!r}; labels are class indices (0, "
                        f"1, ...), so the array is corrupt. Fix it.")
    if labels.size and (np.any(labels != np.round(labels)) or labels.min() < 0):
        bad = labels[(labels != np.round(labels)) | (labels < 0)][:3].tolist()
        raise DataError(f"{npz_path}: '{key}' holds values such as {bad}; labels must be integer class indices "
                        f">= 0.")
    return labels.astype(np.int64)
