"""Image files (PNG, JPEG, TIFF, BMP; DICOM via `medtricks.data.dicom`) to float32 arrays in [0, 1].

Bit depth is preserved: 8-bit files are divided by 255, 16-bit files by 65535, so a 16-bit radiograph keeps its
grey levels instead of coming out white or clipped (the classic bug of `convert("L")` on a 16-bit PNG).
Colour is kept as 3 channels; `to_channels` turns RGB or RGBA screenshots into grey when a recipe asks for 1
channel (ITU-R BT.601 luma, as Pillow's "L" mode), or repeats grey into 3.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medtricks.data.archive import MAX_RATIO, RATIO_FROM_BYTES
from medtricks.data.dicom import is_dicom, read_dicom, require_file
from medtricks.errors import UNREADABLE_FIX as _FIX
from medtricks.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# the eval transform resizes the short side to ~256 px: a 1 x 100,000 strip (a small file under Pillow's pixel limit)
# would become 256 x 25.6 M pixels; no medical image is this elongated
MAX_ASPECT = 50


def _pil_to_array(img: Image.Image, path: Path) -> tuple[np.ndarray, int, str]:
    """Pillow image -> (H, W) or (H, W, 3) array, its bit depth, and a photometric name."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img, dtype=np.uint16), 16, "MONOCHROME2"
    if mode == "I":  # 32-bit integer container; PNG 16-bit grey opens like this in some Pillow versions
        arr = np.asarray(img, dtype=np.int64)
        if arr.min() < 0 or arr.max() > 65535:  # Pillow opens signed 16-bit TIFFs (I;16S) in this mode too
            raise DataError(f"{path}: integer pixels outside 0..65535 (signed, or wider than 16 bits, from "
                            f"{arr.min()} to {arr.max()}) are not supported: their display mapping is unknown; save "
                            f"the image as unsigned 8- or 16-bit, or as DICOM with its rescale. {_FIX}")
        return arr.astype(np.uint16), 16, "MONOCHROME2"
    if mode == "F":
        raise DataError(f"{path}: floating-point image files are not supported; save as 8- or 16-bit. {_FIX}")
    if mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"), dtype=np.uint8), 8, "MONOCHROME2"
    # P (palette), RGBA, CMYK, YCbCr, ...: RGB; an alpha channel is dropped (screenshots are opaque)
    return np.asarray(img.convert("RGB"), dtype=np.uint8), 8, "RGB"


def _check_ratio(img: Image.Image, path: Path) -> None:
    """Refuse a file whose pixels decode to far more than images ever compress from (Pillow's pixel limit alone lets
    a 236 kB PNG of 9000 x 9000 x 3 zeros take gigabytes once converted to float)."""
    band_bytes = 4 if img.mode in ("I", "F") else 2 if img.mode.startswith("I;16") else 1
    decoded = img.width * img.height * len(img.getbands()) * band_bytes
    stored = max(path.stat().st_size, 1)
    if decoded > RATIO_FROM_BYTES and decoded > MAX_RATIO * stored:
        raise DataError(f"{path}: {img.width} x {img.height} pixels ({decoded / 1024**2:.0f} MB decoded) from a "
                        f"{stored / 1024:.0f} kB file: more than {MAX_RATIO}-fold, far more than images compress (a "
                        f"decompression bomb?); refused. Save the real pixels again, or downsample the file.")


def read_picture(path: Path) -> tuple[np.ndarray, dict]:
    """Read a PNG / JPEG / TIFF / BMP file as float32 (C, H, W) in [0, 1] plus safe metadata."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_ratio(img, path)  # from the header: nothing decoded yet
                img.load()
                if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":  # MPO: a phone JPEG and its preview
                    logger.warning("%s holds %d frames (a stack or an animation); only the first is read.", path,
                                   img.n_frames)
                img = ImageOps.exif_transpose(img)  # phone/dermatoscope JPEGs store their rotation in EXIF
                arr, bits, photometric = _pil_to_array(img, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"{path}: image is too large to decode safely ({exc}). This guards against decompression bombs; "
            f"downsample the file first."
        ) from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"{path}: not a readable image (empty, truncated, or another format). {_FIX}") from exc
    except DataError:  # a ValueError already named and advised (a float image, ...): not wrapped again
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode the image ({type(exc).__name__}: {exc}). {_FIX}") from exc
    scale = 65535.0 if bits == 16 else 255.0
    pixels = arr.astype(np.float32) / scale
    pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    meta = {
        "format": path.suffix.lower().lstrip(".") or "image",
        "photometric": photometric,
        "bits_stored": bits,
        "bit_depth": bits,
        "size": [int(arr.shape[0]), int(arr.shape[1])],
    }
    return np.ascontiguousarray(pixels), meta


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Convert (C, H, W) pixels to `channels` (1 or 3): RGB -> grey by BT.601 luma, grey -> RGB by repetition."""
    have = pixels.shape[0]
    if have == channels:
        return pixels
    if have == 3 and channels == 1:
        return np.tensordot(LUMA, pixels, axes=(0, 0))[None].astype(np.float32)
    if have == 1 and channels == 3:
        return np.repeat(pixels, 3, axis=0)
    raise ValueError(f"cannot convert {have} channels to {channels}")


def check_pixels(pixels: np.ndarray, path: Path | str) -> None:
    """Refuse decoded (C, H, W) intensities that would train or predict silently wrong, or allocate without bound:
    no pixels, an aspect ratio over MAX_ASPECT, or NaN / infinite values (e.g. a DICOM rescale slope of NaN).

    Raises:
        DataError: naming the file and the reason.
    """
    height, width = pixels.shape[-2:]
    if min(height, width) < 1:
        raise DataError(f"{path}: the image has no pixels ({height} x {width}). {_FIX}")
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise DataError(f"{path}: {height} x {width} pixels: one side is more than {MAX_ASPECT} times the other; "
                        f"resizing its short side for the model would need a huge image. Crop it first. {_FIX}")
    if not np.isfinite(pixels).all():
        raise DataError(f"{path}: {int((~np.isfinite(pixels)).sum())} pixel(s) are NaN or infinite after the "
                        f"intensity mapping (a damaged rescale slope/intercept or VOI LUT in a DICOM). {_FIX}")


def read_image(path: str | Path, channels: int | None = None) -> tuple[np.ndarray, dict]:
    """Read any supported image file as display intensities.

    Args:
        path: a DICOM (`.dcm` or any name with the DICM preamble) or a PNG / JPEG / TIFF / BMP file.
        channels: 1 or 3 to convert; None keeps the file's own channels.

    Returns:
        `(pixels, meta)`: float32 (C, H, W) in [0, 1] and safe metadata (format, photometric, bit depth, size;
        for DICOM also modality and view). Never patient identifiers.

    Raises:
        DataError: naming the file, when it is missing, empty, corrupt, truncated or of an unknown type, or its
            pixels fail `check_pixels`.
    """
    path = Path(path)
    require_file(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes). {_FIX}")
    if is_dicom(path):
        pixels, meta = read_dicom(path)
    else:
        pixels, meta = read_picture(path)
    check_pixels(pixels, path)
    if channels is not None:
        pixels = to_channels(pixels, channels)
    return pixels, meta
