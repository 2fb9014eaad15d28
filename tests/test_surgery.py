"""BatchNorm surgery: zero-gamma resets per stage, freezing, stage bookkeeping and per-stage learning rates.

Models are built with weights="none"; their BN parameters and running statistics are randomized first so that
gamma/beta/mean/var look like pretrained ones and a reset is visible.
"""

import copy
from collections import Counter

import pytest
import torch
from torch import nn

from medtricks.errors import RecipeError
from medtricks.models import (
    ARCHS,
    apply_bn_reset,
    apply_freeze,
    create_model,
    residual_bns,
    stage_names,
    stage_of_parameter,
    stage_parameter_groups,
)
from medtricks.tricks.zero_gamma import apply_zero_gamma

BN = nn.modules.batchnorm._BatchNorm
RESNET_STAGES = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
STAGES = {
    "resnet18": RESNET_STAGES,
    "resnet50": RESNET_STAGES,
    "resnet50d": RESNET_STAGES,
    "densenet121": ["stem", "denseblock1", "transition1", "denseblock2", "transition2", "denseblock3", "transition3",
                    "denseblock4", "head"],
    "efficientnet_lite0": ["stem", *[f"blocks.{i}" for i in range(7)], "head"],
}


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRICKS_OFFLINE", "1")
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "cache"))


def _pretrained_like(arch: str, seed: int = 0):
    """A random model whose BN gamma, beta and running stats are non-trivial, in eval mode."""
    torch.manual_seed(seed)
    model = create_model(arch, 2, weights="none").eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BN):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _residual_blocks(model):
    return [(f"layer{i}.{j}", block) for i in range(1, 5)
            for j, block in enumerate(getattr(model.backbone, f"layer{i}"))]


def _clone_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- zero-gamma resets ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "closing"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_gamma_zero_beta_turns_every_block_into_its_shortcut(arch, closing):
    model = _pretrained_like(arch)
    untouched = copy.deepcopy(model)
    names = apply_bn_reset(model, ["layer1", "layer2", "layer3", "layer4"], gamma="zero", which="last_in_block",
                           beta="zero")
    assert names == [f"{name}.{closing}" for name, _ in _residual_blocks(model)]

    torch.manual_seed(1)
    with torch.no_grad():
        for (name, block), (_, original) in zip(_residual_blocks(model), _residual_blocks(untouched), strict=True):
            x = torch.randn(2, block.conv1.in_channels, 8, 8)
            shortcut = block.downsample(x) if block.downsample is not None else x
            torch.testing.assert_close(block(x), torch.relu(shortcut), msg=name)
            assert not torch.allclose(original(x), torch.relu(shortcut)), name  # the reset made the difference
            assert torch.equal(block.bn1.weight, original.bn1.weight)  # only the closing BN is touched


@pytest.mark.parametrize("stage", ["stem", "head"])
def test_last_in_block_on_a_stage_without_blocks_is_an_error(stage):
    model = create_model("resnet18", 2, weights="none")
    before = _clone_state(model)
    with pytest.raises(RecipeError, match="residual"):
        apply_bn_reset(model, [stage], which="last_in_block")
    with pytest.raises(RecipeError, match=stage):
        apply_bn_reset(model, ["layer2", stage], which="last_in_block")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing reset before the error


@pytest.mark.parametrize(("gamma", "beta", "running_stats"), [("one", "keep", "reset"), ("zero", "zero", "keep")])
def test_reset_of_layer4_changes_only_layer4_bns(gamma, beta, running_stats):
    model = _pretrained_like("resnet18")
    before = _clone_state(model)
    names = apply_bn_reset(model, ["layer4"], gamma=gamma, which="all", beta=beta, running_stats=running_stats)
    expected = [n for n, m in model.backbone.named_modules() if isinstance(m, BN) and n.startswith("layer4.")]
    assert sorted(names) == sorted(expected) and len(names) == 5  # 2 blocks x (bn1, bn2) + downsample.1

    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in after.items():
        bn = key.rsplit(".", 1)[0].removeprefix("backbone.")
        if bn not in names:
            assert torch.equal(value, before[key]), key
            continue
        field = key.rsplit(".", 1)[1]
        if field == "weight":
            assert torch.all(value == (1.0 if gamma == "one" else 0.0)), key
        elif field == "bias":
            assert torch.equal(value, before[key] if beta == "keep" else torch.zeros_like(value)), key
        elif running_stats == "keep":
            assert torch.equal(value, before[key]), key
        elif field == "running_mean":
            assert torch.all(value == 0), key
        elif field == "running_var":
            assert torch.all(value == 1), key


def test_densenet_all_bns_of_denseblock4_but_no_last_in_block():
    model = _pretrained_like("densenet121")
    before = _clone_state(model)
    names = apply_bn_reset(model, ["denseblock4"], gamma="zero", which="all")
    expected = [n for n, m in model.backbone.named_modules()
                if isinstance(m, BN) and n.startswith("features.denseblock4.")]
    assert sorted(names) == sorted(expected) and len(names) == 32  # 16 layers x (norm1, norm2)
    for name in names:
        assert torch.all(model.backbone.get_submodule(name).weight == 0), name
    assert torch.equal(model.backbone.features.norm5.weight, before["backbone.features.norm5.weight"])
    assert torch.equal(model.backbone.features.transition3.norm.weight,
                       before["backbone.features.transition3.norm.weight"])

    with pytest.raises(RecipeError, match="residual"):
        apply_bn_reset(model, ["denseblock1"], which="last_in_block")
    with pytest.raises(RecipeError, match="residual"):
        apply_bn_reset(model, "all", which="last_in_block")


def test_efficientnet_last_in_block_only_where_there_is_a_skip():
    model = _pretrained_like("efficientnet_lite0")
    before = _clone_state(model)
    found = residual_bns(model, stage_names(model))
    assert found["blocks.0"] == [] and found["blocks.6"] == []  # no skip: channels or stride change
    assert found["blocks.1"] == ["blocks.1.1.bn3"]
    assert found["blocks.5"] == ["blocks.5.1.bn3", "blocks.5.2.bn3", "blocks.5.3.bn3"]

    names = apply_bn_reset(model, ["blocks.1"], gamma="zero", which="last_in_block", beta="zero")
    assert names == ["blocks.1.1.bn3"]
    block = model.backbone.blocks[1][1]
    x = torch.randn(2, block.conv_pw.in_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)  # an inverted residual with a zero branch is the identity
    assert torch.equal(model.backbone.blocks[1][0].bn3.weight, before["backbone.blocks.1.0.bn3.weight"])

    with pytest.raises(RecipeError, match=r"blocks\.0"):
        apply_bn_reset(model, ["blocks.0"], which="last_in_block")


def test_zero_gamma_trick_on_every_residual_stage_of_resnet18():
    model = _pretrained_like("resnet18")
    before = _clone_state(model)
    names = apply_zero_gamma(model, None, beta="zero")  # the trick's defaults: every stage with residual blocks
    blocks = _residual_blocks(model)
    assert names == [f"{name}.bn2" for name, _ in blocks] and len(names) == 8
    for name, block in blocks:
        assert torch.all(block.bn2.weight == 0) and torch.all(block.bn2.bias == 0), name
        assert torch.equal(block.bn1.weight, before[f"backbone.{name}.bn1.weight"]), name
    assert torch.equal(model.backbone.bn1.weight, before["backbone.bn1.weight"])


def test_zero_gamma_trick_on_efficientnet_skips_blocks_without_shortcut():
    model = _pretrained_like("efficientnet_lite0")
    names = apply_zero_gamma(model)
    assert len(names) == 9  # blocks.1..5 have 1, 1, 2, 2, 3 blocks with a skip
    assert all(torch.all(model.backbone.get_submodule(n).weight == 0) for n in names)


def test_bad_reset_options_are_recipe_errors():
    model = create_model("resnet18", 2, weights="none")
    for kwargs in [{"gamma": "half"}, {"which": "first"}, {"beta": "one"}, {"running_stats": "zero"}]:
        with pytest.raises(RecipeError):
            apply_bn_reset(model, ["layer4"], **kwargs)
    with pytest.raises(RecipeError, match="layer5") as info:
        apply_bn_reset(model, ["layer5"])
    assert "stem, layer1, layer2, layer3, layer4, head" in str(info.value)


# ---- freezing ---------------------------------------------------------------------------------------------------

def test_freeze_stem_and_layer1():
    model = _pretrained_like("resnet18")
    frozen = {"stem", "layer1"}
    count = apply_freeze(model, ["stem", "layer1"])
    owner = stage_of_parameter(model)
    params = dict(model.named_parameters())
    assert count == sum(owner[n] in frozen for n in params) > 0
    for name, param in params.items():
        assert param.requires_grad == (owner[name] not in frozen), name

    def frozen_bn(name):
        return name == "bn1" or name.startswith("layer1.")

    model.train()
    bns = [(n, m) for n, m in model.backbone.named_modules() if isinstance(m, BN)]
    for name, bn in bns:
        assert bn.training == (not frozen_bn(name)), name
    assert model.training and model.backbone.layer2.training

    before = _clone_state(model)
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64))
    for name, _ in bns:
        key = f"backbone.{name}.running_mean"
        assert torch.equal(model.state_dict()[key], before[key]) == frozen_bn(name), name

    model.eval()
    assert not any(bn.training for _, bn in bns)
    model.train()  # frozen BNs stay in eval after a round trip
    assert all(bn.training == (not frozen_bn(n)) for n, bn in bns)


def test_frozen_parameters_get_no_gradient():
    model = create_model("resnet18", 2, weights="none")
    apply_freeze(model, ["stem"])
    model.train()
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    assert model.backbone.conv1.weight.grad is None
    assert model.backbone.layer1[0].conv1.weight.grad is not None


# ---- stages ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(STAGES))
def test_every_parameter_has_exactly_one_stage(arch):
    assert set(ARCHS) == set(STAGES)
    model = create_model(arch, 2, weights="none")
    assert list(stage_names(model)) == STAGES[arch]
    owner = stage_of_parameter(model)
    names = [n for n, _ in model.named_parameters()]
    assert set(owner) == set(names)
    assert set(owner.values()) == set(STAGES[arch])  # no empty stage

    counts = Counter(n for paths in ARCHS[arch].stages.values() for path in paths
                     for n, _ in model.backbone.get_submodule(path).named_parameters(prefix=f"backbone.{path}"))
    assert set(counts.values()) == {1}  # no parameter in two stages

    order = [STAGES[arch].index(owner[n]) for n in names]
    assert order == sorted(order)  # stages run input to output
    assert owner[names[0]] == "stem" and owner[names[-1]] == "head"


def test_stage_parameter_groups():
    model = create_model("resnet18", 2, weights="none")
    apply_freeze(model, ["stem"])
    groups = stage_parameter_groups(model, {"layer4": 0.1, "head": 10})
    assert [g["stage"] for g in groups] == ["layer1", "layer2", "layer3", "layer4", "head"]
    assert {g["stage"]: g["lr_mult"] for g in groups} == {"layer1": 1.0, "layer2": 1.0, "layer3": 1.0,
                                                          "layer4": 0.1, "head": 10.0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    listed = [n for g in groups for n in g["names"]]
    assert len(listed) == len(set(listed)) and set(listed) == trainable
    owner = stage_of_parameter(model)
    params = dict(model.named_parameters())
    for group in groups:
        assert all(owner[n] == group["stage"] for n in group["names"])
        assert all(p is params[n] for n, p in zip(group["names"], group["params"], strict=True))
    torch.optim.SGD([{"params": g["params"], "lr": 0.1 * g["lr_mult"]} for g in groups])  # optimizer accepts it

    default = stage_parameter_groups(create_model("resnet18", 2, weights="none"))
    assert [g["stage"] for g in default] == RESNET_STAGES and {g["lr_mult"] for g in default} == {1.0}


def test_stage_parameter_groups_bad_multipliers():
    model = create_model("resnet18", 2, weights="none")
    with pytest.raises(RecipeError, match="layer9") as info:
        stage_parameter_groups(model, {"layer9": 0.1})
    assert "stem, layer1, layer2, layer3, layer4, head" in str(info.value)
    for bad in (-0.5, float("nan")):
        with pytest.raises(RecipeError, match=">= 0"):
            stage_parameter_groups(model, {"layer1": bad})
    assert stage_parameter_groups(model, {"layer1": 0.0})[1]["lr_mult"] == 0.0
