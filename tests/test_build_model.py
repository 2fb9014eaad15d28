import pytest
import torch

from medtricks.errors import MedtricksError
from medtricks.models.build import build_model
from medtricks.recipe import ModelConfig, build_dataclass


def test_build_model_applies_resets_then_freeze():
    config = build_dataclass(ModelConfig, {
        "arch": "resnet18", "weights": "none",
        "bn_reset": [{"stages": ["layer4"], "gamma": "zero", "beta": "zero"}, {"stages": ["layer3"], "gamma": "one",
                                                                                "which": "all"}],
        "freeze": ["stem", "layer1"], "lr_multipliers": {"layer2": 0.5}}, "model")
    model = build_model(config, num_classes=2, in_chans=1)
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in model.backbone.layer4)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.backbone.layer3.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    assert not model.backbone.conv1.weight.requires_grad and model.backbone.layer2[0].conv1.weight.requires_grad
    assert model.frozen_stages == ("stem", "layer1")
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 2)


@pytest.mark.parametrize("raw, words", [
    ({"arch": "resnet1000"}, ["model.arch", "resnet50d"]),
    ({"arch": "resnet18", "weights": "imagenet21k"}, ["model.weights", "imagenet21k", "known: imagenet"]),
    ({"arch": "resnet18", "weights": "none", "freeze": ["layer9"]}, ["model.freeze", "layer9", "layer4"]),
    ({"arch": "resnet18", "weights": "none", "lr_multipliers": {"fc": 2.0}}, ["model.lr_multipliers", "head"]),
    ({"arch": "densenet121", "weights": "none", "bn_reset": [{"stages": ["denseblock4"]}]}, ["residual"]),
])
def test_bad_model_config(raw, words):
    with pytest.raises(MedtricksError) as info:
        build_model(build_dataclass(ModelConfig, raw, "model"), num_classes=2, in_chans=3)
    for word in words:
        assert word in str(info.value)
