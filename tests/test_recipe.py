import pytest

from medtricks.errors import RecipeError
from medtricks.recipe import DataConfig, Recipe, SplitConfig, TrainConfig, build_dataclass, load_recipe, set_key


def test_data_section_builds_with_types_and_defaults():
    config = build_dataclass(DataConfig, {"classes": [0, 1, 2], "channels": 3, "image_size": 128,
                                          "split": {"train": 0.8, "val": 0.1, "test": 0.1}}, "data")
    assert config.classes == ("0", "1", "2")
    assert config.split == SplitConfig(0.8, 0.1, 0.1)
    assert config.augment == "cxr" and config.cache == "auto"


@pytest.mark.parametrize("raw, words", [
    ({"image_sise": 128}, ["data.image_sise", "image_size"]),
    ({"channels": 2}, ["data.channels", "1", "3"]),
    ({"channels": "one"}, ["data.channels", "int"]),
    ({"augment": "hue_party"}, ["data.augment", "cxr"]),
    ({"cache": "ssd"}, ["data.cache", "disk"]),
    ({"on_error": "ignore"}, ["data.on_error", "skip"]),
    ({"split": {"train": 0.7, "val": 0.2, "test": 0.2}}, ["sum to 1"]),
    ({"split": {"train": 0.7, "validation": 0.3}}, ["data.split.validation", "val"]),
    ({"classes": ["a", "a"]}, ["duplicate"]),
    ({"image_size": True}, ["data.image_size"]),
])
def test_bad_data_keys_name_the_key(raw, words):
    with pytest.raises(RecipeError) as info:
        build_dataclass(DataConfig, raw, "data")
    for word in words:
        assert word in str(info.value)


def test_set_overrides_parse_yaml_and_null_removes_a_trick():
    raw = {"data": {"image_size": 224}, "tricks": {"mixup": {"alpha": 0.2}, "warmup": {}}}
    set_key(raw, "data.image_size=128")
    set_key(raw, "tricks.mixup=null")
    set_key(raw, "data.split.val=0.2")
    assert raw["data"]["image_size"] == 128 and raw["data"]["split"] == {"val": 0.2}
    assert "mixup" not in raw["tricks"] and "warmup" in raw["tricks"]
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        set_key(raw, "data.image_size")


def test_load_recipe_from_file_with_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("seed: 3\ndata:\n  classes: [normal, opacity]\n  image_size: 64\n")
    recipe = load_recipe(path, ["data.channels=3"], seed=7)
    assert isinstance(recipe, Recipe)
    assert recipe.name == "mine" and recipe.seed == 7
    assert recipe.data.channels == 3 and recipe.data.classes == ("normal", "opacity")
    assert recipe.to_dict()["data"]["classes"] == ["normal", "opacity"]


def test_unknown_recipe_and_top_level_key(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'no_such_recipe'"):
        load_recipe("no_such_recipe")
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ntrian: {}\n")
    with pytest.raises(RecipeError, match="unknown recipe key 'trian'.*train"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_model_section_strict():
    from medtricks.recipe import BNResetConfig, ModelConfig

    config = build_dataclass(ModelConfig, {"arch": "resnet18", "bn_reset": [{"stages": ["layer4"], "gamma": "one"}],
                                           "freeze": ["stem"], "lr_multipliers": {"stem": 0.1}}, "model")
    assert config.bn_reset == (BNResetConfig(stages=("layer4",), gamma="one"),)
    assert config.freeze == ("stem",) and config.lr_multipliers == {"stem": 0.1}
    with pytest.raises(RecipeError, match=r"'model.bn_reset\[0\].stages' is required"):
        build_dataclass(ModelConfig, {"bn_reset": [{"gamma": "one"}]}, "model")
    with pytest.raises(RecipeError, match=r"model.lr_multipliers.stem.*float"):
        build_dataclass(ModelConfig, {"lr_multipliers": {"stem": "fast"}}, "model")
    with pytest.raises(RecipeError, match="model.archh"):
        build_dataclass(ModelConfig, {"archh": "resnet18"}, "model")


def test_attack_section_strict():
    from medtricks.errors import MedtricksError
    from medtricks.recipe import AttackSettings

    settings = build_dataclass(AttackSettings, {"eps": [0.01, 0.02], "steps": 5, "norm": "l2"}, "attack")
    assert settings.eps == (0.01, 0.02) and settings.steps == 5 and settings.method == "pgd"
    with pytest.raises(MedtricksError, match="unknown recipe key 'attack.epsilon'"):
        build_dataclass(AttackSettings, {"epsilon": [0.01]}, "attack")
    with pytest.raises(MedtricksError, match="must be in"):
        build_dataclass(AttackSettings, {"eps": [2.0]}, "attack")


@pytest.mark.parametrize("raw, words", [
    ({"threshold": "otsu"}, ["train.threshold", "youden", "logistic"]),
    ({"select_metric": "kappa"}, ["train.select_metric", "auroc"]),
])
def test_bad_train_keys_name_the_key(raw, words):
    with pytest.raises(RecipeError) as info:
        build_dataclass(TrainConfig, raw, "train")
    for word in words:
        assert word in str(info.value)
    assert build_dataclass(TrainConfig, {"threshold": "logistic"}, "train").threshold == "logistic"
