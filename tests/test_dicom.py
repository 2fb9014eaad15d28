"""DICOM reading: display mapping (BitsStored mask, modality LUT, VOI, MONOCHROME1), bad input and header safety.

Every DICOM is written here with pydicom into `tmp_path` from a small array, and the expected display values are
computed by hand from DICOM PS3.3 C.11.2.1.2, independently of `medtricks.data.dicom.window`. The real-file test
reads the two pydicom-data chest radiographs in /work/shared/data/dicom (skipped when they are absent).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from medtricks.data.dicom import is_dicom, read_dicom, window
from medtricks.data.images import read_image
from medtricks.errors import DataError

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
IDENTIFIERS = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-12345",
    "PatientBirthDate": "19700101",
    "InstitutionName": "General Hospital",
    "AccessionNumber": "ACC-98765",
    "ReferringPhysicianName": "House^Gregory",
}


def make_cr(arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **elements) -> Dataset:
    """A minimal valid CR dataset (Explicit VR Little Endian) holding `arr`, plus any extra header `elements`."""
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    ds.set_pixel_data(arr, photometric_interpretation=photometric, bits_stored=bits_stored or arr.dtype.itemsize * 8)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(shape=(8, 8), step: int = 60, dtype=np.uint16) -> np.ndarray:
    """0, step, 2*step, ... laid out row by row: every pixel value differs, so a wrong mapping shows."""
    return (np.arange(np.prod(shape)) * step).reshape(shape).astype(dtype)


def read(path: Path) -> tuple[np.ndarray, dict]:
    pixels, meta = read_image(path)
    assert pixels.dtype == np.float32
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    return pixels, meta


def assert_pixels(actual: np.ndarray, expected: np.ndarray, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        torch.from_numpy(actual), torch.from_numpy(expected.astype(np.float32)), atol=atol, rtol=0
    )


# ---- window(): PS3.3 C.11.2.1.2 checked at hand-computed points -------------------------------------------------


@pytest.mark.parametrize(
    ("function", "center", "width", "x", "expected"),
    [
        # LINEAR: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; with c=100, w=51 the ramp spans 75..124
        ("LINEAR", 100, 51, 75.0, 0.01),
        ("LINEAR", 100, 51, 100.0, 0.51),
        ("LINEAR", 100, 51, 74.0, 0.0),
        ("LINEAR", 100, 51, 125.0, 1.0),
        # LINEAR_EXACT: (x - (c - w/2)) / w
        ("LINEAR_EXACT", 100, 50, 75.0, 0.0),
        ("LINEAR_EXACT", 100, 50, 90.0, 0.3),
        ("LINEAR_EXACT", 100, 50, 125.0, 1.0),
        # SIGMOID: 1 / (1 + exp(-4 (x - c) / w)); 1/(1+e^-2) = 0.88079707797788
        ("SIGMOID", 100, 50, 100.0, 0.5),
        ("SIGMOID", 100, 50, 125.0, 0.88079707797788),
        ("SIGMOID", 100, 50, 75.0, 1 - 0.88079707797788),
    ],
)
def test_window_matches_dicom_formulas(function, center, width, x, expected):
    out = window(np.array([x]), center, width, function)
    assert out.dtype == np.float32
    assert out[0] == pytest.approx(expected, abs=1e-6)


# ---- (a) no window: min-max ------------------------------------------------------------------------------------


def test_no_window_is_min_max(tmp_path):
    arr = ramp(step=50) + 100  # 100 .. 3250 in 12 bits
    pixels, meta = read(save(make_cr(arr, bits_stored=12), tmp_path / "minmax.dcm"))
    expected = (arr.astype(np.float64) - 100) / (3250 - 100)
    assert pixels.shape == (1, 8, 8)
    assert_pixels(pixels[0], expected)
    assert meta["format"] == "dicom"
    assert meta["modality"] == "CR"
    assert meta["view"] == "PA"
    assert meta["photometric"] == "MONOCHROME2"
    assert meta["bits_stored"] == 12
    assert meta["size"] == [8, 8]
    assert meta["bit_depth"] == 16


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("limit", [None, 4095])
def test_padding_pixels_are_left_out_of_the_range_and_shown_as_background(tmp_path, photometric, limit):
    """PixelPaddingValue (to PixelPaddingRangeLimit) marks pixels outside the patient (PS3.3 C.7.5.1.1.2): taken
    into the min-max range, a padding of 4095 around values 100..1000 squeezed the body into a quarter of it."""
    arr = ramp(step=14) + 100  # 100 .. 982
    arr[:2] = 4095 if limit is None else 4000 + np.arange(16).reshape(2, 8)  # the padded border
    elements = {"PixelPaddingValue": 4095 if limit is None else 4000}
    if limit is not None:
        elements["PixelPaddingRangeLimit"] = limit
    pixels, _ = read(save(make_cr(arr, photometric, bits_stored=12, **elements), tmp_path / "padded.dcm"))
    body = (arr[2:].astype(np.float64) - arr[2:].min()) / (arr[2:].max() - arr[2:].min())
    assert_pixels(pixels[0, 2:], body if photometric == "MONOCHROME2" else 1.0 - body)
    assert_pixels(pixels[0, :2], np.zeros((2, 8)))  # background: dark, as air is, whatever the photometric


def test_constant_image_without_window_is_black_not_nan(tmp_path):
    arr = np.full((4, 4), 700, np.uint16)
    pixels, _ = read(save(make_cr(arr, bits_stored=12), tmp_path / "flat.dcm"))
    assert not np.isnan(pixels).any()
    assert_pixels(pixels[0], np.zeros((4, 4)))


def test_8_bit_dicom_has_bit_depth_8(tmp_path):
    arr = ramp(step=4, dtype=np.uint8)  # 0 .. 252
    pixels, meta = read(save(make_cr(arr), tmp_path / "eight.dcm"))
    assert meta["bit_depth"] == 8
    assert meta["bits_stored"] == 8
    assert_pixels(pixels[0], arr / 252.0)


# ---- (b) RescaleSlope / RescaleIntercept with a window in modality units ---------------------------------------


def test_rescale_then_window_in_modality_units(tmp_path):
    arr = ramp(step=10)  # stored 0 .. 630
    slope, intercept, center, width = 2.0, -1024.0, -700.0, 301.0
    ds = make_cr(
        arr, bits_stored=12, RescaleSlope=slope, RescaleIntercept=intercept, WindowCenter=center, WindowWidth=width
    )
    pixels, _ = read(save(ds, tmp_path / "rescale.dcm"))

    modality = arr.astype(np.float64) * slope + intercept  # -1024 .. 236
    expected = np.clip((modality - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    assert 0 < (expected == 0).sum() and 0 < (expected == 1).sum() and 0 < ((expected > 0) & (expected < 1)).sum()
    assert_pixels(pixels[0], expected)


def test_window_in_stored_units_would_differ(tmp_path):
    """Guard that the rescale is applied before the window: the same window on stored values gives another image."""
    arr = ramp(step=10)
    ds = make_cr(
        arr, bits_stored=12, RescaleSlope=2.0, RescaleIntercept=-1024.0, WindowCenter=-700.0, WindowWidth=301.0
    )
    pixels, _ = read(save(ds, tmp_path / "rescale.dcm"))
    wrong = np.clip((arr - (-700.0 - 0.5)) / 300.0 + 0.5, 0, 1)  # window applied to stored values
    assert np.abs(pixels[0] - wrong).max() > 0.5


# ---- (c) MONOCHROME1 is inverted -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "window_elements", [{}, {"WindowCenter": 1500.0, "WindowWidth": 2000.0}], ids=["minmax", "window"]
)
def test_monochrome1_is_inverse_of_monochrome2(tmp_path, window_elements):
    arr = ramp(step=55)
    mono1, meta1 = read(save(make_cr(arr, "MONOCHROME1", 12, **window_elements), tmp_path / "m1.dcm"))
    mono2, meta2 = read(save(make_cr(arr, "MONOCHROME2", 12, **window_elements), tmp_path / "m2.dcm"))
    assert meta1["photometric"] == "MONOCHROME1"
    assert meta2["photometric"] == "MONOCHROME2"
    assert_pixels(mono1 + mono2, np.ones((1, 8, 8)))
    assert mono2[0, 0, 0] < mono2[0, -1, -1]  # MONOCHROME2: high stored value is bright
    assert mono1[0, 0, 0] > mono1[0, -1, -1]  # MONOCHROME1: high stored value is dark


# ---- (d) 12 bits stored in 16 with junk in the high bits -------------------------------------------------------


@pytest.mark.parametrize(
    "window_elements", [{}, {"WindowCenter": 2000.0, "WindowWidth": 3001.0}], ids=["minmax", "window"]
)
def test_junk_in_unused_high_bits_is_masked(tmp_path, window_elements):
    arr = ramp(step=60)  # 0 .. 3780, fits in 12 bits
    clean_path = save(make_cr(arr, bits_stored=12, **window_elements), tmp_path / "clean.dcm")
    ds = make_cr(arr, bits_stored=12, **window_elements)
    junk = np.where(np.arange(arr.size).reshape(arr.shape) % 2 == 0, 0xA000, 0xF000).astype(np.uint16)
    ds.PixelData = (arr | junk).astype("<u2").tobytes()  # set the 4 unused high bits directly in the bytes
    junk_path = save(ds, tmp_path / "junk.dcm")
    assert (np.frombuffer(junk_path.read_bytes()[-arr.size * 2 :], "<u2") >> 12 != 0).all()  # junk really written

    clean, _ = read(clean_path)
    dirty, meta = read(junk_path)
    assert meta["bits_stored"] == 12
    assert_pixels(dirty, clean)
    if not window_elements:
        assert_pixels(dirty[0], arr / 3780.0)


def test_signed_12_bit_data_keeps_negative_values(tmp_path):
    arr = (ramp(step=60, dtype=np.int64) - 2000).astype(np.int16)  # -2000 .. 1780
    pixels, _ = read(save(make_cr(arr, bits_stored=12), tmp_path / "signed.dcm"))
    assert_pixels(pixels[0], (arr.astype(np.float64) + 2000) / 3780.0)


# ---- (e) several window presets: the first is used ------------------------------------------------------------


def test_first_of_several_windows_is_used(tmp_path):
    arr = ramp(step=60)
    ds = make_cr(arr, bits_stored=12, WindowCenter=[1000.0, 3000.0], WindowWidth=[1001.0, 200.0])
    ds.WindowCenterWidthExplanation = ["SOFT", "BONE"]
    pixels, _ = read(save(ds, tmp_path / "presets.dcm"))
    expected = np.clip((arr - (1000.0 - 0.5)) / 1000.0 + 0.5, 0, 1)
    assert_pixels(pixels[0], expected)


# ---- (f) VOILUTFunction SIGMOID and LINEAR_EXACT ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "formula"),
    [
        ("SIGMOID", lambda x, c, w: 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))),
        ("LINEAR_EXACT", lambda x, c, w: np.clip((x - (c - w / 2)) / w, 0, 1)),
        ("LINEAR", lambda x, c, w: np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)),
    ],
)
def test_voi_lut_function(tmp_path, function, formula):
    arr = ramp(step=60)
    center, width = 1800.0, 1500.0
    ds = make_cr(arr, bits_stored=12, WindowCenter=center, WindowWidth=width, VOILUTFunction=function)
    pixels, _ = read(save(ds, tmp_path / f"{function}.dcm"))
    assert_pixels(pixels[0], formula(arr.astype(np.float64), center, width))


def test_sigmoid_with_rescale_uses_modality_units(tmp_path):
    arr = ramp(step=20)
    ds = make_cr(
        arr,
        bits_stored=12,
        RescaleSlope=0.5,
        RescaleIntercept=-100.0,
        WindowCenter=200.0,
        WindowWidth=400.0,
        VOILUTFunction="SIGMOID",
    )
    pixels, _ = read(save(ds, tmp_path / "sigmoid_rescale.dcm"))
    modality = arr * 0.5 - 100.0
    assert_pixels(pixels[0], 1.0 / (1.0 + np.exp(-4.0 * (modality - 200.0) / 400.0)))


# ---- (g) VOI LUT Sequence --------------------------------------------------------------------------------------


def add_voi_lut(ds: Dataset, descriptor: list[int], data: list[int]) -> None:
    item = Dataset()
    item.add_new("LUTDescriptor", "SS" if descriptor[1] < 0 else "US", descriptor)  # US or SS: SS for negative
    item.add_new("LUTData", "US", data)  # LUTData is US or OW; US keeps the list readable
    ds.VOILUTSequence = Sequence([item])


@pytest.mark.parametrize("lut_bits", [16, 12])
def test_voi_lut_sequence(tmp_path, lut_bits):
    arr = ramp(step=3)  # 0 .. 189
    first_mapped, n_entries = 40, 100
    lut = [(i * i * 7) % 2**lut_bits for i in range(n_entries)]  # non-monotonic, so a min-max fallback cannot pass
    # a window too, which the VOI LUT must take precedence over
    ds = make_cr(arr, bits_stored=12, WindowCenter=100.0, WindowWidth=50.0)
    add_voi_lut(ds, [n_entries, first_mapped, lut_bits], lut)
    pixels, _ = read(save(ds, tmp_path / "voilut.dcm"))

    index = np.clip(arr.astype(np.int64) - first_mapped, 0, n_entries - 1)  # below first: entry 0, above: last
    expected = np.asarray(lut, np.float64)[index] / (2**lut_bits - 1)
    assert_pixels(pixels[0], expected)


def test_voi_lut_sequence_after_rescale(tmp_path):
    """The VOI LUT indexes modality values: first_mapped is in modality units (here negative)."""
    arr = ramp(step=3)  # stored 0 .. 189 -> modality -1024 .. -835
    lut = [i * 600 for i in range(100)]
    ds = make_cr(arr, bits_stored=12, RescaleSlope=1.0, RescaleIntercept=-1024.0)
    add_voi_lut(ds, [100, -1000, 16], lut)
    path = save(ds, tmp_path / "voilut_rescale.dcm")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Applying a VOI LUT on a float input array")  # pydicom; values integral
        pixels, _ = read(path)
    index = np.clip(arr.astype(np.int64) - 1024 + 1000, 0, 99)
    assert_pixels(pixels[0], np.asarray(lut, np.float64)[index] / 65535)


def test_voi_lut_sequence_monochrome1_is_inverted(tmp_path):
    arr = ramp(step=3)
    lut = [min(65535, i * 700) for i in range(100)]
    ds = make_cr(arr, "MONOCHROME1", bits_stored=12)
    add_voi_lut(ds, [100, 40, 16], lut)
    pixels, _ = read(save(ds, tmp_path / "voilut_m1.dcm"))
    index = np.clip(arr.astype(np.int64) - 40, 0, 99)
    assert_pixels(pixels[0], 1.0 - np.asarray(lut, np.float64)[index] / 65535)


def test_8_bit_voi_lut_sequence_with_4096_entries(tmp_path):
    """pydicom 3.0.2's apply_voi wraps such a LUT every 256 entries; medtricks does the lookup itself."""
    arr = ramp(step=60)  # 0 .. 3780: a 12-bit image
    lut = [i // 16 for i in range(4096)]  # 12-bit input -> 8-bit output, a common VOI LUT shape
    ds = make_cr(arr, bits_stored=12)
    add_voi_lut(ds, [4096, 0, 8], lut)
    pixels, _ = read(save(ds, tmp_path / "voilut8.dcm"))
    assert_pixels(pixels[0], (arr // 16) / 255.0)


def test_voi_lut_values_past_the_end_take_the_last_entry(tmp_path):
    arr = ramp(step=60)  # 0 .. 3780
    lut = list(range(256))
    ds = make_cr(arr, bits_stored=12)
    add_voi_lut(ds, [256, 1000, 8], lut)
    pixels, _ = read(save(ds, tmp_path / "voilut_tail.dcm"))
    assert_pixels(pixels[0], np.clip(arr.astype(np.int64) - 1000, 0, 255) / 255.0)


# ---- (h) the real files ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pair() -> dict[str, tuple[np.ndarray, dict]]:
    names = ["RG1_UNCR.dcm", "RG1_J2KI.dcm"]
    missing = [name for name in names if not (REAL_DIR / name).is_file()]
    if missing:
        pytest.skip(f"real DICOM files {missing} not found in {REAL_DIR} (pydicom-data chest radiographs)")
    return {name: read_image(REAL_DIR / name) for name in names}


def as_256(pixels: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.interpolate(torch.from_numpy(pixels)[None], size=(256, 256), mode="area")[0, 0]


def test_real_files_decode_and_agree(real_pair):
    resized = []
    for name, (pixels, meta) in real_pair.items():
        assert pixels.dtype == np.float32, name
        assert pixels.ndim == 3 and pixels.shape[0] == 1, name
        assert list(pixels.shape[1:]) == meta["size"], name
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0, name
        assert pixels.std() > 0.05, name  # a real picture, not a flat or clipped one
        assert meta["photometric"] == "MONOCHROME1"
        resized.append(as_256(pixels).flatten())
    corr = torch.corrcoef(torch.stack(resized))[0, 1].item()
    assert corr >= 0.99


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KI.dcm"])
def test_real_monochrome1_has_bright_mediastinum(real_pair, name):
    # Observed: centre ~0.85, lungs ~0.57 (a third down, 40-row band, 32-column boxes at 1/4, 1/2 and 3/4 across)
    image = as_256(real_pair[name][0])
    band = image[256 // 3 - 20 : 256 // 3 + 20]
    left, centre, right = (band[:, c - 16 : c + 16].mean().item() for c in (64, 128, 192))
    assert centre > left + 0.15
    assert centre > right + 0.15


# ---- (i) bad input ---------------------------------------------------------------------------------------------


def assert_data_error(path: Path, reader=read_image) -> str:
    with pytest.raises(DataError) as info:
        reader(path)
    assert path.name in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_dicom(tmp_path, fraction):
    full = save(make_cr(ramp(step=60), bits_stored=12), tmp_path / "full.dcm").read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(full[: int(len(full) * fraction)])
    message = assert_data_error(path)
    assert "truncated" in message


def test_dicom_without_pixel_data(tmp_path):
    ds = make_cr(ramp(), bits_stored=12)
    del ds.PixelData
    message = assert_data_error(save(ds, tmp_path / "header_only.dcm"))
    assert "no pixel data" in message


def test_multi_frame_dicom(tmp_path):
    frames = np.stack([ramp(step=10), ramp(step=20)])
    ds = make_cr(frames, bits_stored=12)
    assert int(ds.NumberOfFrames) == 2
    message = assert_data_error(save(ds, tmp_path / "two_frames.dcm"))
    assert "2 frames" in message


def test_text_file_named_dcm(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("not an image, just some notes about the patient\n" * 5)
    assert_data_error(path)


@pytest.mark.parametrize("reader", [read_image, read_dicom], ids=["read_image", "read_dicom"])
def test_missing_dicom(tmp_path, reader):
    assert_data_error(tmp_path / "missing.dcm", reader)


def test_empty_dicom(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    assert_data_error(path)


# ---- (j) no patient identifiers in meta ------------------------------------------------------------------------


def test_meta_has_no_patient_identifiers(tmp_path):
    ds = make_cr(ramp(), bits_stored=12, StudyDate="20240131", **IDENTIFIERS)
    path = save(ds, tmp_path / "identified.dcm")
    assert pydicom.dcmread(path).PatientID == "MRN-12345"  # the identifiers really are in the file
    _, meta = read(path)
    text = json.dumps(meta)
    for value in [*IDENTIFIERS.values(), "Doe", "Jane", "20240131"]:
        assert value not in text
    assert set(meta) == {"format", "modality", "view", "photometric", "bits_stored", "size", "bit_depth"}


# ---- (k) DICOM without a .dcm suffix ---------------------------------------------------------------------------


def test_extensionless_dicom_detected_by_preamble(tmp_path):
    arr = ramp(step=60)
    path = save(make_cr(arr, bits_stored=12), tmp_path / "IM000001")
    assert path.suffix == ""
    assert is_dicom(path)
    pixels, meta = read(path)
    assert meta["format"] == "dicom"
    assert_pixels(pixels[0], arr / 3780.0)


def test_is_dicom_false_for_other_files(tmp_path):
    path = tmp_path / "IM000002"
    path.write_bytes(b"\x00" * 200)
    assert not is_dicom(path)
    assert not is_dicom(tmp_path / "missing")
    assert is_dicom(tmp_path / "anything.DCM")  # by suffix alone, case-insensitive


# ---- (l) RGB DICOM ---------------------------------------------------------------------------------------------


def test_rgb_dicom(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    ds = make_cr(arr, "RGB", 8)
    assert ds.SamplesPerPixel == 3
    pixels, meta = read(save(ds, tmp_path / "rgb.dcm"))
    assert pixels.shape == (3, 4, 6)
    assert meta["bit_depth"] == 8
    assert meta["photometric"] == "RGB"
    assert_pixels(pixels, np.moveaxis(arr, -1, 0) / 255.0)


def test_rgb_dicom_to_one_channel_uses_luma(tmp_path):
    arr = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    pixels, _ = read_image(save(make_cr(arr, "RGB", 8), tmp_path / "rgb.dcm"), channels=1)
    assert_pixels(pixels, np.array([[[0.299, 0.587, 0.114, 1.0]]]))


def _patched(ds: Dataset, path: Path, placeholder: bytes, value: bytes) -> Path:
    """Save, then overwrite a header value in the bytes (pydicom would refuse to write a malformed one)."""
    data = save(ds, path).read_bytes()
    assert data.count(placeholder) == 1
    path.write_bytes(data.replace(placeholder, value.ljust(len(placeholder))))
    return path


@pytest.mark.parametrize("damage", ["frames", "slope", "short_modality_lut", "modality_lut_without_data",
                                    "negative_width"])
def test_damaged_header_values_are_named_not_a_traceback(tmp_path, damage):
    """A malformed number (IS/DS 'abc'), a modality LUT without or with too little data, a LINEAR window of negative
    width: each is a DataError naming the file and the damage, so predict lists the file and a data set names it."""
    path = tmp_path / f"{damage}.dcm"
    if damage == "frames":
        path, words = _patched(make_cr(ramp(), bits_stored=12, NumberOfFrames="12345678"), path, b"12345678", b"abc"), \
            ["NumberOfFrames", "whole number"]
    elif damage == "slope":
        path, words = _patched(make_cr(ramp(), bits_stored=12, RescaleSlope="9.876543", RescaleIntercept="0"), path,
                               b"9.876543", b"abc"), ["modality mapping", "damaged"]
    elif damage == "negative_width":
        path, words = save(make_cr(ramp(), bits_stored=12, WindowCenter="100", WindowWidth="-100"), path), \
            ["VOI", "damaged"]
    else:
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16] if damage == "short_modality_lut" else [0, 0, 0]
        if damage == "short_modality_lut":
            item.LUTData, item.ModalityLUTType = b"\x00\x01", "HU"
        path, words = save(make_cr(ramp(), bits_stored=12, ModalityLUTSequence=Sequence([item])), path), \
            ["modality mapping", "damaged"]
    message = assert_data_error(path)
    for word in words:
        assert word in message, message


def test_deflated_dicom_is_read_and_a_deflate_bomb_is_refused_before_inflating(tmp_path):
    """pydicom inflates a Deflated Explicit VR file whole before any check: an honest one reads as the same image,
    one whose private element inflates 70 MB of zeros from ~70 kB is refused, also where only the header is read."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from medtricks.data.dicom import read_patient_id

    arr = ramp()
    honest = make_cr(arr, bits_stored=12)
    honest.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    pixels, _ = read(save(honest, tmp_path / "deflated.dcm"))
    assert_pixels(pixels[0], arr / arr.max())
    bomb = make_cr(arr, bits_stored=12)
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb.add_new(0x00991010, "OB", bytes(70 * 1024**2))
    path = save(bomb, tmp_path / "bomb.dcm")
    assert path.stat().st_size < 1024**2
    assert "zip bomb" in assert_data_error(path)
    with pytest.raises(DataError, match="zip bomb"):
        read_patient_id(path)


def test_dicom_header_announcing_a_huge_image_is_refused(tmp_path):
    ds = make_cr(ramp(), bits_stored=12)
    ds.Rows, ds.Columns = 30000, 30000  # a bomb: the header asks for 1.8 GB of pixels
    message = assert_data_error(save(ds, tmp_path / "bomb.dcm"))
    assert "30000 x 30000" in message and "downsample" in message


def test_pydicom_remarks_are_logged_once_naming_the_file_without_header_values(tmp_path, caplog, capfd):
    """pydicom warns about a value that breaks the standard but still reads (IS '1.0'), quoting the value (header
    values can identify a patient) and pointing at its own source file: medtricks names the file, cuts the value out,
    says it once per kind, and lets neither pydicom's warning nor its log record through."""
    from medtricks.data import dicom
    from medtricks.data.dicom import read_patient_id

    dicom._REMARKED, saved = set(), dicom._REMARKED
    try:
        paths = [_patched(make_cr(ramp(), bits_stored=12, NumberOfFrames="12345678", PatientID="DOE^JANE"),
                          tmp_path / f"{i}.dcm", b"12345678", b"1.0") for i in range(2)]
        caplog.set_level("DEBUG")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning that gets out fails the test
            for path in paths:
                pixels, _ = read(path)
                assert pixels.shape == (1, 8, 8) and read_patient_id(path) == "DOE^JANE"
    finally:
        dicom._REMARKED = saved
    remarks = [r.getMessage() for r in caplog.records if "VR IS" in r.getMessage()]
    assert remarks == [f"{paths[0]}: Invalid value for VR IS: '…' (pydicom read the file anyway; other files with "
                       f"this remark are not listed)."]
    printed = capfd.readouterr().err
    assert "1.0" not in printed and "site-packages" not in printed


def _compressed_cr(codestream: bytes, syntax, rows: int, columns: int) -> Dataset:
    from pydicom.encaps import encapsulate

    ds = make_cr(np.zeros((rows, columns), np.uint8))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    return ds


def _encoded(fmt: str, size=(24, 40), **options) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(size[1], dtype=np.uint8) * 5, (size[0], 1))).save(buffer, fmt, **options)
    return buffer.getvalue()


def test_the_size_a_codestream_declares_is_read_from_its_header():
    from medtricks.data.dicom import codestream_size

    assert codestream_size(_encoded("JPEG")) == (24, 40)
    assert codestream_size(_encoded("JPEG2000", no_jp2=True)) == (24, 40)
    assert codestream_size(_encoded("JPEG2000")) == (24, 40)  # wrapped in a JP2 file
    assert codestream_size(b"not an image") is None and codestream_size(b"\xff\xd8\xff") is None


@pytest.mark.parametrize("fmt, options, syntax", [("JPEG2000", {"no_jp2": True, "irreversible": False},
                                                   "1.2.840.10008.1.2.4.90"),
                                                  ("JPEG", {"quality": 95}, "1.2.840.10008.1.2.4.50")])
def test_a_codestream_declaring_another_size_than_the_header_is_not_decoded(tmp_path, fmt, options, syntax):
    """A 1 kB file whose codestream says 20000 x 20000 under a 24 x 40 header made openjpeg allocate 1.8 GB."""
    from pydicom.uid import UID

    stream = bytearray(_encoded(fmt, **options))
    good = save(_compressed_cr(bytes(stream), UID(syntax), 24, 40), tmp_path / "good.dcm")
    assert read(good)[0].shape == (1, 24, 40)
    if fmt == "JPEG2000":
        at = stream.find(b"\xff\x51")
        stream[at + 6:at + 14] = (20000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    else:
        at = stream.find(b"\xff\xc0")
        stream[at + 5:at + 9] = (20000).to_bytes(2, "big") * 2  # Y, X
    bomb = save(_compressed_cr(bytes(stream), UID(syntax), 24, 40), tmp_path / "bomb.dcm")
    with pytest.raises(DataError, match="declares a 20000 x 20000 image, but the header 24 x 40"):
        read_dicom(bomb)
