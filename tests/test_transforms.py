import pytest
import torch

from medtricks.data.transforms import (
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    Lighting,
    RandomGamma,
    cache_size,
    create_eval_transform,
    create_train_transform,
)
from medtricks.recipe import AUGMENT_PRESETS


@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_give_size_channels_and_range(preset, channels):
    torch.manual_seed(0)
    transform = create_train_transform(preset, 32, channels)
    image = torch.rand(channels, 50, 41)
    for _ in range(5):
        out = transform(image)
        assert out.shape == (channels, 32, 32) and out.dtype == torch.float32
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_eval_transform_resizes_short_side_then_centre_crops():
    assert cache_size(224, 0.875) == 256
    image = torch.zeros(1, 256, 512)
    image[:, :, 256 - 16:256 + 16] = 1.0  # a bright vertical band in the centre survives the centre crop
    out = create_eval_transform(32, 0.5)(image)  # short side 64, then crop 32 from the centre
    assert out.shape == (1, 32, 32)
    assert float(out[0, :, 12:20].mean()) > 0.9 and float(out[0, :, :4].mean()) < 0.05


def test_cxr_preset_never_flips():
    torch.manual_seed(0)
    transform = create_train_transform("cxr", 64, 1)
    image = torch.zeros(1, 64, 64)
    image[:, :, :16] = 1.0  # bright left edge: must stay on the left (small rotations and shifts only)
    for _ in range(30):
        out = transform(image)
        assert float(out[0, :, :20].mean()) > float(out[0, :, -20:].mean())


def test_lighting_adds_pca_noise_reference():
    torch.manual_seed(3)
    image = torch.full((3, 4, 4), 0.5)
    out = Lighting(0.1)(image)
    torch.manual_seed(3)
    alpha = torch.randn(3) * 0.1
    expected = image + (IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL)).view(3, 1, 1)
    torch.testing.assert_close(out, expected)


def test_random_gamma_within_range():
    torch.manual_seed(0)
    image = torch.full((1, 2, 2), 0.5)
    values = torch.stack([RandomGamma((0.8, 1.25))(image)[0, 0, 0] for _ in range(200)])
    assert float(values.min()) >= 0.5**1.25 - 1e-6 and float(values.max()) <= 0.5**0.8 + 1e-6
    assert float(values.max() - values.min()) > 0.05


@pytest.mark.parametrize("channels", [1, 3])
def test_bag_of_tricks_colour_jitter_is_the_papers(channels):
    """He et al. 2019: brightness, contrast and saturation scaled by factors from [0.6, 1.4], no hue rotation (a
    ColorJitter hue of 0.4 would turn hues by up to +-144 degrees); saturation only where there is colour."""
    from torchvision.transforms import v2

    (jitter,) = [t for t in create_train_transform("bag_of_tricks", 32, channels).transforms
                 if isinstance(t, v2.ColorJitter)]
    assert jitter.hue is None
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == (pytest.approx((0.6, 1.4)) if channels == 3 else None)
