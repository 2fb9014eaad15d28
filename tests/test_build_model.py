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


STAGE_ERRORS = [
    (["model.freeze=[blocks.9]"], ["model.freeze", "blocks.9", "blocks.6"]),
    (["model.freeze=[stem, blocks.0, blocks.1, blocks.2, blocks.3, blocks.4, blocks.5, blocks.6, head]"],
     ["model.freeze", "every stage", "nothing would train"]),
    (["model.bn_reset=[{stages: [layer4]}]"], ["model.bn_reset[0].stages", "layer4", "blocks.6"]),
    (["model.bn_reset=[{stages: [blocks.5], gamma: half}]"], ["model.bn_reset[].gamma", "half", "zero"]),
    (["model.lr_multipliers={fc: 2.0}"], ["model.lr_multipliers", "fc", "head"]),
    (["tricks.zero_gamma={stages: [layer3]}"], ["tricks.zero_gamma.stages", "layer3", "blocks.5"]),
]


@pytest.mark.parametrize("overrides, words", STAGE_ERRORS)
def test_stage_errors_fail_the_recipe_check_before_any_data_or_file(overrides, words, phantoms_train, tmp_path,
                                                                    monkeypatch):
    """Unknown stages and freeze-all are caught by the recipe check: exit 2 naming the key, before the data source
    is read, any image decoded, or the run directory (or anything else) written."""
    from typer.testing import CliRunner

    import medtricks.data.dataset
    import medtricks.data.pipeline
    from medtricks.cli import app

    read = []
    monkeypatch.setattr(medtricks.data.pipeline, "load_source", lambda *a, **k: read.append(a) or 1 / 0)
    monkeypatch.setattr(medtricks.data.dataset, "decode", lambda *a, **k: read.append(a) or 1 / 0)
    before = sorted(p.relative_to(phantoms_train) for p in phantoms_train.rglob("*"))
    out = tmp_path / "run"
    sets = [x for kv in ["data.workers=0", "data.image_size=32", *overrides] for x in ("--set", kv)]
    result = CliRunner().invoke(app, ["finetune", "--recipe", "demo", "--data", str(phantoms_train), "--out", str(out),
                                      *sets])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)
    assert read == [] and not out.exists() and list(tmp_path.iterdir()) == []
    assert sorted(p.relative_to(phantoms_train) for p in phantoms_train.rglob("*")) == before
