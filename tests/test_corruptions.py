"""Natural corruptions: the output contract, determinism per image, severity order, references, evaluation, plots."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import hsv2rgb, rgb2hsv
from skimage.filters import gaussian
from torch.testing import assert_close

from medtricks import corruptions
from medtricks.corruption_report import evaluate_corruptions
from medtricks.corruptions import (
    CORRUPTIONS,
    PRESET_OF_AUGMENT,
    PRESETS,
    check_preset,
    corrupt,
    default_preset,
)
from medtricks.plots import plot_corruption_gallery, plot_corruptions
from medtricks.recipe import AUGMENT_PRESETS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GREY_OK = [name for name, c in CORRUPTIONS.items() if not c.colour_only]
CASES = [(name, channels) for name in CORRUPTIONS for channels in (1, 3)
         if channels == 3 or not CORRUPTIONS[name].colour_only]


def phantom(n: int = 2, channels: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0.1, 0.9]: bilinear upsampling of 6 x 6 noise (like anatomy, unlike white noise, which
    blur and JPEG would change by ~0.2 even at severity 1); colour channels differ, so hue and saturation act."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 6, 6, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    return 0.1 + 0.8 * smooth


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


@pytest.mark.parametrize(("name", "channels"), CASES)
def test_output_is_a_new_float32_tensor_in_0_1_and_the_input_is_kept(name, channels):
    images = phantom(channels=channels)
    kept = images.clone()
    for severity in range(6):
        out = corrupt(images, name, severity, seed=1)
        assert out.shape == images.shape and out.dtype == torch.float32 and out.device == images.device
        assert out.min() >= 0 and out.max() <= 1
        assert out.data_ptr() != images.data_ptr()
    assert torch.equal(images, kept)
    assert corrupt(images.double(), name, 3).dtype == torch.float32


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_same_seed_same_output_and_a_new_seed_new_draws(name):
    images = phantom(channels=3)
    first, again, other = (corrupt(images, name, 3, seed=s) for s in (7, 7, 8))
    assert torch.equal(first, again)
    assert torch.equal(first, other) != CORRUPTIONS[name].random  # only random corruptions depend on the seed


@pytest.mark.parametrize(("name", "channels"), CASES)
def test_an_image_is_corrupted_the_same_alone_or_in_any_batch(name, channels):
    images = phantom(n=3, channels=channels, seed=2)
    index = torch.tensor([40, 41, 42])  # dataset indices of a later batch
    batch = corrupt(images, name, 4, seed=3, index=index)
    alone = corrupt(images[1:2], name, 4, seed=3, index=index[1:2])
    assert_close(alone[0], batch[1])
    reordered = corrupt(images.flip(0), name, 4, seed=3, index=index.flip(0))
    assert_close(reordered.flip(0), batch)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_cpu_chunks_give_the_same_output_as_one_call(name, monkeypatch):
    images = phantom(n=5, channels=3, seed=13)
    whole = corrupt(images, name, 2, seed=4)
    monkeypatch.setattr(corruptions, "_CPU_CHUNK", 2 * images[0].numel())  # chunks of 2, 2 and 1 images
    assert_close(corrupt(images, name, 2, seed=4), whole)


@pytest.mark.parametrize(("name", "channels"), CASES)
def test_severity_0_is_the_clean_image(name, channels):
    images = phantom(channels=channels)
    assert torch.equal(corrupt(images, name, 0), images)


@pytest.mark.parametrize(("name", "channels"), CASES)
def test_severity_1_is_mild_and_the_change_grows_with_severity(name, channels):
    # <= 0.1: ImageNet-C's largest change at severity 1 is brightness, which raises every pixel of a grey image by
    # exactly 0.1 (26 grey levels of 255); every other corruption must be milder than that at severity 1
    images = phantom(n=4, channels=channels, size=48, seed=4)
    changes = [distance(corrupt(images, name, s, seed=5), images) for s in range(1, 6)]
    assert changes[0] <= 0.1 + 1e-6, changes
    assert all(b >= a - 1e-6 for a, b in zip(changes, changes[1:], strict=False)), changes
    assert changes[-1] > changes[0], changes


@pytest.mark.parametrize("name", [name for name, c in CORRUPTIONS.items() if c.colour_only])
def test_colour_corruptions_refuse_grey_images(name):
    with pytest.raises(ValueError, match=f"colour-only corruption.*{name}.*1 channel"):
        corrupt(phantom(channels=1), name, 2)


def test_unknown_names_severities_and_bad_inputs_are_refused_with_the_choices():
    images = phantom()
    with pytest.raises(ValueError, match=r"unknown corruption 'fog'; choose from \['gaussian_noise'"):
        corrupt(images, "fog", 1)
    for severity in (6, -1, 2.5, 2.0, True):
        with pytest.raises(ValueError, match=f"severity {severity!r} of corruption 'contrast'.*0 \\(clean\\) to 5"):
            corrupt(images, "contrast", severity)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        corrupt(images * 255, "contrast", 1)
    for index, seed in ((torch.tensor([0]), 0), (torch.tensor([0.0, 1.0]), 0), (torch.tensor([-1, 0]), 0), (None, -1)):
        with pytest.raises(ValueError, match="one integer >= 0 per image"):
            corrupt(images, "gaussian_noise", 1, seed, index)
    assert corrupt(images[:0], "gaussian_noise", 3).shape == (0, 1, 32, 32)


def test_presets_name_existing_corruptions_and_are_checked_against_the_channels():
    for preset, names in PRESETS.items():
        assert set(names) <= set(CORRUPTIONS) and len(set(names)) == len(names), preset
        assert check_preset(preset, 3) == names
    assert set(PRESETS["radiograph"]) <= set(GREY_OK)  # every radiograph corruption works on grey images
    assert set(PRESETS["radiograph"]) < set(PRESETS["fundus"]) < set(PRESETS["dermoscopy"])
    assert check_preset("fundus", 1) == PRESETS["fundus"]
    with pytest.raises(ValueError, match=r"preset 'dermoscopy'.*\['hue_shift', 'desaturate'\].*1 channel"):
        check_preset("dermoscopy", 1)
    with pytest.raises(ValueError, match=r"unknown corruption preset 'ct'; choose one of \['radiograph'"):
        check_preset("ct", 1)
    assert {default_preset(augment, 3) for augment in AUGMENT_PRESETS} == set(PRESETS)
    assert [default_preset(a, 1) for a in ("cxr", "fundus", "bag_of_tricks", "none")] == ["radiograph", "fundus",
                                                                                          "radiograph", "radiograph"]
    assert all(default_preset(augment, 3) == preset for augment, preset in PRESET_OF_AUGMENT.items())
    with pytest.raises(ValueError, match="colour-only"):
        default_preset("dermoscopy", 1)
    with pytest.raises(ValueError, match=r"unknown data.augment 'ct'; choose one of \['bag_of_tricks'"):
        default_preset("ct", 1)


# --- references written here ---------------------------------------------------------------------------------------

def test_brightness_shifts_the_hsv_value_as_imagenet_c_does_with_skimage():
    images = phantom(n=2, channels=3, seed=6)
    images[0, :, :4, :4] = 0.0  # black pixels become grey `shift`
    for severity, shift in enumerate(CORRUPTIONS["brightness"].severities, start=1):
        hsv = rgb2hsv(images.permute(0, 2, 3, 1).double().numpy())
        hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
        expected = torch.from_numpy(hsv2rgb(hsv)).permute(0, 3, 1, 2).float()
        assert_close(corrupt(images, "brightness", severity), expected, atol=1e-5, rtol=0)


def test_contrast_pulls_each_channel_towards_its_own_mean_as_imagenet_c_does():
    images = phantom(n=2, channels=3, seed=11)
    x = images.permute(0, 2, 3, 1).double().numpy()
    means = x.mean(axis=(1, 2), keepdims=True)  # ImageNet-C: per image and channel
    expected = torch.from_numpy((x - means) * 0.2 + means).permute(0, 3, 1, 2).float()
    assert_close(corrupt(images, "contrast", 3), expected)


def test_gaussian_blur_matches_skimage_at_224_pixels_and_scales_with_the_image():
    image = phantom(n=1, channels=1, size=224, seed=7)
    for severity in (1, 3):
        sigma = CORRUPTIONS["gaussian_blur"].severities[severity - 1]
        expected = gaussian(image[0, 0].double().numpy(), sigma=sigma, mode="mirror")  # mirror = torch's reflect
        assert_close(corrupt(image, "gaussian_blur", severity)[0, 0], torch.from_numpy(expected).float(), atol=1e-5,
                     rtol=0)
    half = torch.nn.functional.interpolate(image, size=(112, 112), mode="area")
    blurred_half = corrupt(half, "gaussian_blur", 3)
    assert distance(blurred_half, torch.from_numpy(gaussian(half[0, 0].numpy(), sigma=1.5, mode="mirror"))) < 1e-5


@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "motion_blur"])
def test_spatial_sizes_scale_with_the_image_so_a_severity_blurs_the_same_anatomy(name):
    # corrupt at 224 px then halve ~= halve then corrupt: a mismatch of 0.5-6% of the change (41-58% if unscaled)
    g = torch.Generator().manual_seed(12)
    detailed = torch.nn.functional.interpolate(torch.rand(2, 1, 28, 28, generator=g), size=(224, 224), mode="bilinear")
    half = torch.nn.functional.interpolate(detailed, size=(112, 112), mode="area")
    blurred_then_halved = torch.nn.functional.interpolate(corrupt(detailed, name, 3), size=(112, 112), mode="area")
    halved_then_blurred = corrupt(half, name, 3)
    assert distance(blurred_then_halved, halved_then_blurred) < 0.1 * distance(halved_then_blurred, half)


@pytest.mark.parametrize(("size", "severity"), [(34, 1), (41, 1), (50, 2), (50, 5)])
def test_pixelate_is_pils_box_down_then_nearest_up(size, severity):
    # non-integer factors, and 34 px at 0.6 and 41 px at 0.6 put pixel centres exactly on a box edge
    fraction = CORRUPTIONS["pixelate"].severities[severity - 1]
    image = phantom(n=1, channels=1, size=size, seed=8)
    small = int(size * fraction)
    as_pil = Image.fromarray(image[0, 0].numpy(), mode="F")
    expected = as_pil.resize((small, small), Image.Resampling.BOX).resize((size, size), Image.Resampling.NEAREST)
    assert_close(corrupt(image, "pixelate", severity)[0, 0], torch.from_numpy(np.array(expected)), atol=1e-6, rtol=0)


def test_noise_statistics_match_their_definitions():
    flat = torch.full((8, 1, 64, 64), 0.5)
    gaussian_sigma = (corrupt(flat, "gaussian_noise", 1) - flat).std()  # sigma 0.08: clipping at 0/1 is > 6 sigma
    assert abs(float(gaussian_sigma) - 0.08) < 0.002
    shot = corrupt(flat, "shot_noise", 1)  # Poisson(0.5 * 60) / 60: mean 0.5, variance 0.5 / 60
    assert abs(float(shot.mean()) - 0.5) < 0.003 and abs(float(shot.var()) - 0.5 / 60) < 0.0006
    impulse = corrupt(flat, "impulse_noise", 5)  # 27% of values: half to 0, half to 1
    assert abs(float((impulse == 0).float().mean()) - 0.135) < 0.01
    assert abs(float((impulse == 1).float().mean()) - 0.135) < 0.01
    speckle = corrupt(flat, "speckle_noise", 1) - flat  # x * N(0, 0.15): sd 0.075 at x = 0.5, none at x = 0
    assert abs(float(speckle.std()) - 0.075) < 0.002
    assert torch.equal(corrupt(torch.zeros(2, 1, 32, 32), "speckle_noise", 5), torch.zeros(2, 1, 32, 32))


def test_black_corner_keeps_the_centre_and_blackens_the_corners():
    out = corrupt(torch.ones(1, 3, 64, 64), "black_corner", 5)  # circle of 0.9 x 32 px
    assert out[..., 32, 32].eq(1).all() and out[..., 0, 0].eq(0).all() and out[..., 32, 2].eq(0).all()
    assert abs(float(1 - out.mean()) - (1 - np.pi * 0.9 ** 2 / 4)) < 0.01  # the area outside the circle


# --- evaluation ----------------------------------------------------------------------------------------------------

class MeanIntensity(torch.nn.Module):
    """Class 1 when the mean intensity exceeds 0.5: logits (N, 2) = [0, 20 * (mean - 0.5)]."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        score = 20 * (images.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}
            for i in range(0, len(images), batch_size)]


def test_evaluate_corruptions_reports_accuracy_auroc_and_mce_as_computed_by_hand():
    images = phantom(n=10, channels=1, size=32, seed=9)
    model = MeanIntensity().eval()
    labels = (images.mean(dim=(1, 2, 3)) > 0.5).long()
    labels[:2] = 1 - labels[:2]  # two clean mistakes
    names, severities = ("brightness", "gaussian_noise"), (1, 3, 5)  # 2 names, 3 severities: means differ
    calls = []
    report = evaluate_corruptions(model, loader(images, labels, 4), names, severities, seed=2,
                                  progress=lambda done, total: calls.append((done, total)))

    assert set(report) == {"clean", "results", "corruptions", "mce", "relative_mce", "n", "seed", "severities",
                           "parameters", "seconds", "images_per_second", "gallery"}
    assert report["n"] == 10 and report["seed"] == 2 and report["severities"] == [1, 3, 5]
    assert report["clean"]["accuracy"] == pytest.approx(0.8)
    assert calls == [(k, 6) for k in range(1, 7)]  # 3 batches x 2 corruptions
    for row in report["results"]:  # each equals a direct computation on the whole set at once
        corrupted = corrupt(images, row["corruption"], row["severity"], seed=2)
        assert row["accuracy"] == pytest.approx(float((model(corrupted).argmax(1) == labels).float().mean()))
        assert row["auroc"] is None or 0 <= row["auroc"] <= 1
    errors = {(r["corruption"], r["severity"]): 1 - r["accuracy"] for r in report["results"]}
    assert len(errors) == 6
    mean_errors = [np.mean([errors[n, s] for s in severities]) for n in names]
    assert report["mce"] == pytest.approx(np.mean(mean_errors))
    assert report["relative_mce"] == pytest.approx(np.mean([e - 0.2 for e in errors.values()]))
    for row, mean_error in zip(report["corruptions"], mean_errors, strict=True):
        assert row["error_sum"] == pytest.approx(3 * mean_error)
        assert row["relative_error_sum"] == pytest.approx(3 * (mean_error - 0.2))
        assert row["accuracy"] == pytest.approx(1 - mean_error)
    gallery = report["gallery"]
    assert torch.equal(gallery["clean"], images[0]) and list(gallery["images"]) == list(names)
    assert all(len(shown) == len(severities) for shown in gallery["images"].values())
    assert torch.equal(gallery["images"]["gaussian_noise"][2], corrupt(images[:1], "gaussian_noise", 5, seed=2)[0])
    same = evaluate_corruptions(model, loader(images, labels, 3), names, severities, seed=2)  # other batches
    assert same["results"] == report["results"]


def test_evaluate_corruptions_refuses_colour_corruptions_on_grey_images_and_an_empty_loader():
    images, labels = phantom(n=2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="colour-only"):
        evaluate_corruptions(MeanIntensity(), loader(images, labels, 2), PRESETS["dermoscopy"])
    with pytest.raises(ValueError, match="no images"):
        evaluate_corruptions(MeanIntensity(), [], ["contrast"])
    for names, severities in ((["contrast", "contrast"], (1,)), (["contrast"], (0, 1)), (["contrast"], (2, 2))):
        with pytest.raises(ValueError, match="distinct corruptions"):
            evaluate_corruptions(MeanIntensity(), loader(images, labels, 2), names, severities)


# --- plots ---------------------------------------------------------------------------------------------------------

def test_corruption_plots_write_pngs(tmp_path):
    images, labels = phantom(n=6, channels=3, seed=10), torch.tensor([0, 1, 0, 1, 0, 1])
    report = evaluate_corruptions(MeanIntensity(), loader(images, labels, 3), ["contrast", "hue_shift"])
    other = {**report, "run": "baseline"}
    path = plot_corruptions({**report, "run": "recipe"}, tmp_path / "plots" / "corruptions.png", against=other)
    assert path.read_bytes()[:8] == PNG_MAGIC
    gallery = plot_corruption_gallery(report["gallery"], tmp_path / "gallery.png")
    with Image.open(gallery) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]  # 6 columns, 2 rows
    grey = evaluate_corruptions(MeanIntensity(), loader(phantom(n=2), torch.tensor([0, 1]), 2), ["gamma"], (2, 4))
    assert plot_corruption_gallery(grey["gallery"], tmp_path / "grey.png").read_bytes()[:8] == PNG_MAGIC



def test_one_class_in_the_labels_gives_null_aurocs_and_one_warning(caplog):
    images = phantom(n=6, channels=1, size=32, seed=3)
    labels = torch.zeros(6, dtype=torch.long)
    with caplog.at_level("WARNING"):
        report = evaluate_corruptions(MeanIntensity().eval(), loader(images, labels, 2), ["contrast", "gamma"],
                                      (1, 5))
    assert report["clean"]["auroc"] is None and all(r["auroc"] is None for r in report["results"])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "AUROC undefined" in messages[0], messages  # once, not once per corruption
