"""Backbones: output shapes for every architecture, normalization as the first layer, one-channel input modes
(sum: folded first conv; repeat: grey -> RGB inside the model), describe() and bad-input messages."""

import pytest
import torch

from medtricks.errors import MedtricksError
from medtricks.models import ARCHS, Normalize, WeightsError, create_model
from medtricks.models.backbones import first_conv
from medtricks.models.weights import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRICKS_OFFLINE", "1")
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "cache"))


def _stats(arch: str) -> tuple[tuple, tuple]:
    return ((0.5,) * 3, (0.5,) * 3) if arch == "efficientnet_lite0" else (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet50d", "densenet121", "efficientnet_lite0"])
def test_logits_shape_and_normalization_first(arch, in_chans):
    assert arch in ARCHS
    torch.manual_seed(0)
    model = create_model(arch, num_classes=3, in_chans=in_chans, weights="none").eval()
    assert isinstance(model.normalize, Normalize)
    mean, std = _stats(arch)
    if in_chans == 1:  # sum mode: one channel with the mean of the channel statistics
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(mean))
    torch.testing.assert_close(model.normalize.std.flatten(), torch.tensor(std))
    assert first_conv(model.backbone).weight.shape[1] == in_chans

    x = torch.rand(2, in_chans, 64, 64)
    with torch.no_grad():
        logits = model(x)
        reference = model.backbone((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference)


def test_sum_mode_is_exact_for_equal_channel_statistics():
    """EfficientNet-Lite0's mean = std = 0.5: the folded 1-channel model equals the RGB model on grey RGB."""
    colour = create_model("efficientnet_lite0", 1000, in_chans=3, weights="imagenet").eval()
    grey = create_model("efficientnet_lite0", 1000, in_chans=1, weights="imagenet", input_mode="sum").eval()
    assert first_conv(grey.backbone).weight.shape[1] == 1
    torch.testing.assert_close(first_conv(grey.backbone).weight,
                               first_conv(colour.backbone).weight.sum(dim=1, keepdim=True))
    g = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(g), colour(g.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet50d", "densenet121", "efficientnet_lite0"])
def test_sum_mode_is_exact_after_the_stem_norm_for_every_arch(arch):
    """A grey image through the folded 1-channel model equals the grey image repeated to 3 channels through the RGB
    model, at the output of the BatchNorm after the first conv (eval mode), away from the conv's zero padding: the
    per-channel constant that ImageNet's unequal channel statistics leave is folded into that norm's running mean."""
    torch.manual_seed(0)
    colour = create_model(arch, 2, in_chans=3, weights="none").eval()
    torch.manual_seed(0)
    grey = create_model(arch, 2, in_chans=1, weights="none", input_mode="sum").eval()
    assert first_conv(grey.backbone).weight.shape[1] == 1
    outputs = {}
    for name, model in (("grey", grey), ("colour", colour)):
        norm = model.backbone.get_submodule(ARCHS[arch].stem_norm)
        assert isinstance(norm, torch.nn.BatchNorm2d)
        norm.register_forward_hook(lambda module, inputs, output, name=name: outputs.__setitem__(name, output))
    g = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        grey(g)
        colour(g.repeat(1, 3, 1, 1))
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # beyond the reach of the 3x3/7x7 padding
    torch.testing.assert_close(outputs["grey"][interior], outputs["colour"][interior], atol=1e-5, rtol=1e-5)
    if arch != "efficientnet_lite0":  # ImageNet statistics: the fold is not trivially a zero constant
        shift = grey.backbone.get_submodule(ARCHS[arch].stem_norm).running_mean
        assert shift.abs().max() > 1e-3


@pytest.mark.parametrize(("arch", "weights"), [("resnet18", "none"), ("efficientnet_lite0", "imagenet")])
def test_repeat_mode_is_the_rgb_model_on_grey_rgb(arch, weights):
    colour = create_model(arch, 2, in_chans=3, weights=weights).eval()
    grey = create_model(arch, 2, in_chans=1, weights=weights, input_mode="repeat").eval()
    assert grey.normalize.repeat_to == 3
    assert first_conv(grey.backbone).in_channels == 3 and first_conv(grey.backbone).weight.shape[1] == 3
    grey.load_state_dict(colour.state_dict())  # same shapes throughout; same (random) head
    g = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(g), colour(g.repeat(1, 3, 1, 1)), rtol=0, atol=0)


def test_describe():
    model = create_model("resnet18", num_classes=4, in_chans=1, weights="none", input_mode="repeat")
    info = model.describe()
    assert {"arch", "num_classes", "in_chans", "input_mode", "weights", "mean", "std"} <= set(info)
    assert (info["arch"], info["num_classes"], info["in_chans"], info["input_mode"], info["weights"]) == (
        "resnet18", 4, 1, "repeat", "none")
    torch.testing.assert_close(torch.tensor(info["mean"]), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(torch.tensor(info["std"]), torch.tensor(IMAGENET_STD))

    effnet = create_model("efficientnet_lite0", num_classes=2, in_chans=3, weights="imagenet").describe()
    assert effnet["weights"] == "imagenet" and effnet["mean"] == [0.5] * 3 and effnet["std"] == [0.5] * 3


@pytest.mark.parametrize(("kwargs", "must_name"), [
    ({"arch": "vgg16"}, ["resnet18", "resnet50", "resnet50d", "densenet121", "efficientnet_lite0"]),
    ({"in_chans": 2}, ["1", "3"]),
    ({"input_mode": "avg"}, ["'sum'", "'repeat'"]),
    ({"weights": "imagenet21k"}, ["imagenet", "imagenet_v2", "sin", "sin_in", "sin_in_in", "'none'", "local file"]),
    ({"num_classes": 0}, ["num_classes"]),
])
def test_bad_input_lists_the_choices(kwargs, must_name):
    args = {"arch": "resnet50", "num_classes": 2, "in_chans": 3, "weights": "none", **kwargs}
    with pytest.raises(WeightsError) as info:
        create_model(**args)
    assert isinstance(info.value, MedtricksError)
    for word in must_name:
        assert word in str(info.value), (word, str(info.value))
