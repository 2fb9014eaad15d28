"""DICOM radiographs to display intensities in [0, 1].

pydicom decodes the pixel data (pylibjpeg + openjpeg for JPEG 2000) and applies the modality LUT; the display
mapping that radiologists see is done here, because it is where CXR pipelines most often go wrong:

1. stored values limited to BitsStored (pydicom's pixel_array drops junk in the unused high bits; tested);
2. modality LUT: RescaleSlope / RescaleIntercept, or a Modality LUT Sequence (pydicom's `apply_modality_lut`);
3. VOI: a VOI LUT Sequence (first LUT), else WindowCenter / WindowWidth (first value when several, with the
   VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID of DICOM PS3.3 C.11.2.1.2), else the min-max of the image;
4. MONOCHROME1 (high values are dark) inverted, so every image displays bone-bright / air-dark.

Only safe metadata leaves this module (modality, view, size, photometric interpretation, bits stored): never
patient names, ids, dates or institutions.
"""

from __future__ import annotations

import logging
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.pixels
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medtricks.data.archive import MAX_RATIO, RATIO_FROM_BYTES
from medtricks.errors import UNREADABLE_FIX as _FIX
from medtricks.errors import DataError

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
# refuse headers that would make pydicom allocate gigabytes (a decompression bomb); the largest radiographs
# (mammograms, stitched long-length films) hold about 20-30 M pixels
MAX_PIXELS = 10000 * 10000

logger = logging.getLogger(__name__)
_REMARKED: set[str] = set()  # pydicom remarks already logged by this process


class _Mute(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def _pydicom_remarks(path: Path) -> Iterator[None]:
    """Collect what pydicom warns about while it reads `path` and log it once per kind, naming the file, with the
    values cut out: pydicom's own messages quote header values, which can be a patient's name, id or birth date
    (and, with no logging set up, Python prints its logger's records as they are). A file that is then refused
    gets only its error."""
    pydicom_log, mute = logging.getLogger("pydicom"), _Mute()
    pydicom_log.addFilter(mute)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        pydicom_log.removeFilter(mute)
    for remark in dict.fromkeys(_without_values(str(w.message)) for w in caught):
        if remark not in _REMARKED:
            _REMARKED.add(remark)
            logger.warning("%s: %s (pydicom read the file anyway; other files with this remark are not listed).",
                           path, remark)


def _without_values(message: str) -> str:
    """A pydicom remark with its quoted values (header contents) replaced by '…' and its reference links dropped."""
    message = message.split(" Please see <")[0].split("\n")[0]
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message).rstrip(".")


def unreadable_entry(path: Path) -> str | None:
    """Why `path` is no file to read an image from, else None: gone, or a pipe, device or socket (opening one could
    block, or read without end)."""
    try:
        if path.is_file():
            return None
        if path.is_dir():
            return "a folder, not an image file"
        return ("not a regular file (a pipe, a device or a socket, or a link to one)" if path.exists() else
                "file not found")
    except (OSError, ValueError) as exc:  # a name part over 255 bytes, a NUL byte
        return f"cannot use that path ({getattr(exc, 'strerror', None) or exc})"


def require_file(path: Path) -> None:
    """Raise a DataError naming `path` unless it is a regular file (see unreadable_entry)."""
    reason = unreadable_entry(path)
    if reason is not None:
        advice = ("Such an entry is never read as an image; replace it with the image file." if
                  reason.startswith("not a regular") else "Check the path (relative paths are read from the data "
                  "folder).")
        raise DataError(f"{path}: {reason}. {advice}")


def is_dicom(path: Path) -> bool:
    """True for a `.dcm`-like suffix or, for any other name, the `DICM` magic at byte 128 of the file."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _first(value) -> float:
    """First value of a possibly multi-valued DICOM element (WindowCenter may hold several presets)."""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0]
    return float(value)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a DICOM VOI window and return display intensities in [0, 1].

    Args:
        values: modality values (after RescaleSlope / Intercept).
        center, width: WindowCenter / WindowWidth in modality units.
        function: VOILUTFunction: LINEAR (the default, with DICOM's half-unit offsets), LINEAR_EXACT or SIGMOID.
    """
    values = values.astype(np.float64)
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise ValueError(f"invalid VOI window: center {center}, width {width}")
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        out = (values - (center - width / 2)) / width
    else:  # LINEAR; PS3.3 C.11.2.1.2.1 requires width >= 1 (a width in (0, 1) is read as 1)
        width = max(width, 1.0)
        out = (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _minmax(values: np.ndarray, padding: np.ndarray | None = None) -> np.ndarray:
    """The values' range stretched to [0, 1], the range taken outside `padding` (PixelPaddingValue's pixels)."""
    body = values if padding is None or padding.all() else values[~padding]
    lo, hi = float(body.min()), float(body.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def voi_lut(values: np.ndarray, item: pydicom.Dataset) -> np.ndarray:
    """Look modality values up in one VOI LUT (PS3.3 C.11.2.1.1) and return display intensities in [0, 1].

    Done here rather than with pydicom 3.0.2's `apply_voi`, which indexes an 8-bit LUT with uint8 positions, so
    a 4096-entry 12-bit -> 8-bit LUT wraps every 256 values. Values below the first mapped value take the first
    entry, values past the end the last one; non-integer modality values are rounded, not truncated.
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536  # 0 means 2**16 entries
    if first > 32767 and values.min() < 0:
        first -= 65536  # first mapped value stored as US although the modality values are signed
    data = item.get("LUTData")
    if data is None or len(data) == 0:
        raise ValueError("the VOI LUT has no data")
    if isinstance(data, bytes):
        lut = np.frombuffer(data, dtype="<u2" if len(data) >= 2 * entries else np.uint8)
    else:
        lut = np.atleast_1d(np.asarray(data, dtype=np.float64))
    lut = lut[:entries].astype(np.float64)
    if len(lut) == 0 or not 1 <= bits <= 16:
        raise ValueError(f"the VOI LUT is empty or its descriptor is invalid ({entries}, {first}, {bits})")
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, len(lut) - 1)
    return np.clip(lut[index] / float(2**bits - 1), 0.0, 1.0).astype(np.float32)


def _voi(values: np.ndarray, ds: pydicom.Dataset, padding: np.ndarray | None = None) -> np.ndarray:
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        return voi_lut(values, ds.VOILUTSequence[0])
    if "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowCenter is not None and ds.WindowWidth is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
    return _minmax(values, padding)


def _padding(arr: np.ndarray, ds: pydicom.Dataset, path: Path) -> np.ndarray | None:
    """The pixels outside the patient that PixelPaddingValue (up to PixelPaddingRangeLimit) marks, in stored
    values (PS3.3 C.7.5.1.1.2): left out of the display range, and shown as background."""
    if ds.get("PixelPaddingValue") is None:
        return None
    first = _header_int(ds, "PixelPaddingValue", 0, path)
    last = _header_int(ds, "PixelPaddingRangeLimit", first, path) if ds.get("PixelPaddingRangeLimit") is not None \
        else first
    return (arr >= min(first, last)) & (arr <= max(first, last))


def _header_int(ds: pydicom.Dataset, keyword: str, default: int, path: Path) -> int:
    """A whole-number header element (pydicom keeps a malformed IS such as 'abc' as text); a DataError naming it."""
    try:
        value = ds.get(keyword, default)
        return int(value or default)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: the DICOM header's {keyword} is not a whole number ({exc}); the header is damaged. "
                        f"{_FIX}") from exc


def safe_metadata(ds: pydicom.Dataset, path: Path) -> dict:
    """The header fields medtricks may log or store: no patient, study or institution identifiers."""
    return {
        "format": "dicom",
        "modality": str(ds.get("Modality", "")),
        "view": str(ds.get("ViewPosition", "")),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "bits_stored": _header_int(ds, "BitsStored", 0, path),
        "size": [_header_int(ds, "Rows", 0, path), _header_int(ds, "Columns", 0, path)],
    }


def _check_deflated(path: Path) -> None:
    """pydicom inflates a file of the Deflated Explicit VR transfer syntax whole, before any check (even with
    stop_before_pixels): inflate it here first, counting, and refuse what no image compresses to (a zip bomb)."""
    try:
        meta = read_file_meta_info(path)
    except Exception:  # no preamble or a damaged file meta: not deflated as far as pydicom can tell; dcmread decides
        return
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    length = meta.get("FileMetaInformationGroupLength")
    if not isinstance(length, int):
        raise DataError(f"{path}: a deflated DICOM file without a file-meta group length cannot be checked before "
                        f"inflating it. {_FIX}")
    compressed, inflated = path.stat().st_size - (132 + 12 + length), 0  # preamble, DICM, the length element
    limit = max(RATIO_FROM_BYTES, MAX_RATIO * max(compressed, 1))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as PS3.5 A.5 and pydicom use
    with path.open("rb") as f:
        f.seek(132 + 12 + length)
        while chunk := f.read(1 << 20):
            while chunk:
                try:
                    inflated += len(inflater.decompress(chunk, 1 << 24))
                except zlib.error as exc:
                    raise DataError(f"{path}: the deflated DICOM data is corrupt ({exc}). {_FIX}") from exc
                chunk = inflater.unconsumed_tail
                if inflated > limit:
                    raise DataError(f"{path}: the deflated DICOM data inflates more than {MAX_RATIO}-fold (past "
                                    f"{inflated} bytes from {compressed}), far more than images ever compress (a zip "
                                    f"bomb?); refused. {_FIX}")


# what pydicom raises for a header it cannot parse; RecursionError: sequences nested hundreds deep (a crafted file)
_HEADER_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, RecursionError)


def _header_reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "its header nests sequences deeper than the reader can follow, far deeper than an image needs"
    return f"{type(exc).__name__}: {exc}"


def read_patient_id(path: Path) -> str:
    """The header's PatientID ("" when absent), read without pixel data, for sources that group by it (the value
    never leaves medtricks.data.sources, which replaces it with a pseudonym)."""
    _check_deflated(path)
    try:
        with _pydicom_remarks(path):  # pydicom converts (and checks) the value when it is read, so read it here
            return str(pydicom.dcmread(path, stop_before_pixels=True, force=path.suffix.lower() in DICOM_SUFFIXES)
                       .get("PatientID", "") or "")
    except _HEADER_ERRORS as exc:
        raise DataError(f"{path}: not a readable DICOM file ({_header_reason(exc)}). {_FIX}") from exc


# JPEG start-of-frame markers (ISO 10918-1 B.1.1.3; JPEG-LS SOF55, 14495-1): the frame header holds the size
_SOF_MARKERS = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG, JPEG-LS or JPEG 2000 codestream declares, read from its header alone; None
    when the bytes are none of these or are cut short (the decoder then says what is wrong). pydicom's own parsers
    return the precision and sign, not the size."""
    if frame[:8] == b"\x00\x00\x00\x0cjP  ":  # a JP2 file: the codestream is the jp2c box's content
        start = frame.find(b"jp2c")
        frame = frame[start + 4:] if start >= 0 else b""
    if frame[:4] == b"\xff\x4f\xff\x51" and len(frame) >= 24:  # SOC, then SIZ (15444-1 A.5.1)
        width, height, x0, y0 = struct.unpack(">IIII", frame[8:24])
        return height - y0, width - x0
    if frame[:2] != b"\xff\xd8":  # JPEG's SOI
        return None
    at = 2
    while at + 9 <= len(frame) and frame[at] == 0xFF:
        marker = frame[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _SOF_MARKERS:
            height, width = struct.unpack(">HH", frame[at + 5:at + 9])
            return height, width
        at += 2 + struct.unpack(">H", frame[at + 2:at + 4])[0]
    return None


def _check_codestream(ds: pydicom.Dataset, rows: int, columns: int, path: Path) -> None:
    """A compressed frame must declare the header's size: a 1 kB file whose codestream says 20000 x 20000 would
    make the decoder allocate gigabytes that the header check never saw."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_encapsulated:
        return
    try:
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception:  # a damaged encapsulation: pixel_array's decoder names it
        return
    declared = codestream_size(frame)
    if declared is not None and declared != (rows, columns):
        raise DataError(f"{path}: the compressed pixel data declares a {declared[0]} x {declared[1]} image, but the "
                        f"header {rows} x {columns}; the file is damaged or crafted, and is not decoded. {_FIX}")


def read_dicom(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read a DICOM image as display intensities.

    Returns:
        `(pixels, meta)`: pixels float32 of shape (1, H, W) for grey or (3, H, W) for RGB images, values in
        [0, 1], bone bright; meta from `safe_metadata` plus `bit_depth` (8 or 16, the storage depth to cache).

    Raises:
        DataError: naming the file, for a missing, corrupt or truncated file, no pixel data, or several frames.
    """
    path = Path(path)
    with _pydicom_remarks(path):
        return _read_dicom(path)


def _read_dicom(path: Path) -> tuple[np.ndarray, dict]:
    require_file(path)
    _check_deflated(path)
    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except _HEADER_ERRORS as exc:
        raise DataError(f"{path}: not a readable DICOM file ({_header_reason(exc)}). {_FIX}") from exc
    if "PixelData" not in ds:
        if "Rows" not in ds or "SOPClassUID" not in ds:  # force-read garbage, or cut inside the header
            raise DataError(f"{path}: not a readable DICOM image: no image header found, so the file is truncated "
                            f"or not DICOM. {_FIX}")
        raise DataError(
            f"{path}: DICOM file has no pixel data (a header-only export, a report or a presentation state, or a "
            f"file truncated before its pixels). Point the data source at image files only."
        )
    frames = _header_int(ds, "NumberOfFrames", 1, path)
    if frames > 1:
        raise DataError(
            f"{path}: multi-frame DICOM ({frames} frames); medtricks reads single radiographs. Export the frame "
            f"you want as its own file."
        )
    rows, columns, samples = (_header_int(ds, k, 0, path) for k in ("Rows", "Columns", "SamplesPerPixel"))
    if rows * columns * max(samples, 1) > MAX_PIXELS:
        raise DataError(f"{path}: the header announces a {rows} x {columns} x {samples} image, larger than medtricks "
                        f"decodes safely ({MAX_PIXELS} pixels); downsample the file first.")
    _check_codestream(ds, rows, columns, path)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for truncated or malformed pixel data
        raise DataError(f"{path}: cannot decode the DICOM pixel data: the file is truncated or corrupt "
                        f"({type(exc).__name__}: {exc}). {_FIX}") from exc

    meta = safe_metadata(ds, path)
    samples = _header_int(ds, "SamplesPerPixel", 1, path)
    if samples == 3:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise DataError(f"{path}: colour DICOM with unexpected pixel array shape {arr.shape}. {_FIX}")
        if meta["photometric"].startswith("YBR"):
            arr = pydicom.pixels.convert_color_space(arr, meta["photometric"], "RGB")
        bits = _header_int(ds, "BitsStored", 8, path)
        pixels = np.moveaxis(arr.astype(np.float32) / float(2**bits - 1), -1, 0)
        meta["bit_depth"] = 8 if bits <= 8 else 16
        return np.clip(pixels, 0.0, 1.0), meta
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D grey image, got pixel array shape {arr.shape}. {_FIX}")
    if meta["photometric"] == "PALETTE COLOR":  # indices into the file's colour LUT, not intensities
        try:
            rgb = pydicom.pixels.apply_color_lut(arr, ds)
        except Exception as exc:  # pydicom raises ValueError, KeyError, ... for a missing or damaged LUT
            raise DataError(f"{path}: PALETTE COLOR image whose colour lookup table is missing or damaged "
                            f"({type(exc).__name__}: {exc}). {_FIX}") from exc
        scale = 255.0 if rgb.dtype == np.uint8 else 65535.0
        meta["bit_depth"] = 8 if rgb.dtype == np.uint8 else 16
        return np.moveaxis(rgb.astype(np.float32) / scale, -1, 0), meta

    bits_stored = _header_int(ds, "BitsStored", _header_int(ds, "BitsAllocated", 16, path), path)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # an absurd slope overflows: refused just below, by name
            values = pydicom.pixels.apply_modality_lut(arr, ds)
    except Exception as exc:  # a slope that is text, a modality LUT without or with short data: many types
        raise DataError(f"{path}: the modality mapping (rescale slope/intercept or modality LUT) in the header is "
                        f"damaged ({type(exc).__name__}: {exc}). {_FIX}") from exc
    if not np.all(np.isfinite(values)):  # a VOI window would clip inf to white or black: a silently wrong image
        raise DataError(f"{path}: the modality mapping (rescale slope/intercept or modality LUT) gives NaN or "
                        f"infinite values; the header is damaged. {_FIX}")
    padding = _padding(arr, ds, path)
    try:
        display = _voi(values, ds, padding)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DataError(f"{path}: the VOI LUT or window in the header is damaged ({exc}). {_FIX}") from exc
    if meta["photometric"] == "MONOCHROME1":
        display = 1.0 - display
    if padding is not None:
        display = np.where(padding, 0.0, display)  # background, dark (bone bright), whatever the photometric
    meta["bit_depth"] = 8 if bits_stored <= 8 else 16
    return display[None].astype(np.float32), meta
